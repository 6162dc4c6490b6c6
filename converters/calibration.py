"""Calibration sets shared by every converter: real, correctly pre-processed 120x120 face crops.

Two sources: a folder of ready crops (default: the 512 AFLW crops disjoint from AFLW2000-3D), or a folder
of photos run through detector -> roi -> crop. Order is sorted by file name, so a set (and its digest) is
reproducible. A set that shares a file name or a file's bytes with AFLW2000-3D is refused: calibrating on
the evaluation set would flatter every int8 figure.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.errors import Edge3dfaError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass(frozen=True)
class CalibrationSet:
    """``data`` float32 [N,3,120,120] network inputs, plus where they came from (for the manifest)."""

    data: np.ndarray
    folder: str
    files: tuple[str, ...]
    digest: str  # sha256 over (name, bytes) of every file used, in order

    def __len__(self) -> int:
        return len(self.data)

    def split(self, n_first: int) -> tuple[CalibrationSet, CalibrationSet]:
        """Two disjoint sets (e.g. calibrate on one, choose options on the other)."""
        a = CalibrationSet(self.data[:n_first], self.folder, self.files[:n_first], self.digest + ":head")
        b = CalibrationSet(self.data[n_first:], self.folder, self.files[n_first:], self.digest + ":tail")
        return a, b

    def describe(self) -> dict[str, object]:
        return {"folder": self.folder, "count": len(self), "digest": self.digest}


@lru_cache(maxsize=1)
def _evaluation_fingerprint() -> tuple[frozenset[str], frozenset[str]]:
    names = frozenset(assets.fetch("aflw2000_crop_list").read_text().split())
    crops = assets.fetch("aflw2000_crops")
    digests = frozenset(assets.sha256_file(p) for p in crops.iterdir() if p.is_file())
    return names, digests


def _check_disjoint(files: list[Path], blobs: list[bytes]) -> None:
    names, digests = _evaluation_fingerprint()
    for f, blob in zip(files, blobs):
        if f.name in names or hashlib.sha256(blob).hexdigest() in digests:
            raise Edge3dfaError(f"calibration file {f} is part of the AFLW2000-3D evaluation set; "
                                "calibrate on disjoint images (default: images/calibration/aflw_gt_crop_disjoint512)")


def load_calibration(folder: str | os.PathLike | None = None, count: int = 256, detector=None,  # noqa: ANN001
                     check_disjoint: bool = True) -> CalibrationSet:
    """Up to ``count`` crops from ``folder`` (default: asset ``calibration_crops``) in sorted order.

    Images that are not 120x120 are treated as photos and need ``detector`` (a FaceAligner-compatible
    callable ``img -> boxes [K,5]``); the most confident face of each photo is used.
    """
    folder = Path(folder) if folder is not None else assets.fetch("calibration_crops")
    if not folder.is_dir():
        raise Edge3dfaError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise Edge3dfaError(f"no images in calibration folder {folder}")
    blobs = [p.read_bytes() for p in files]
    if check_disjoint:
        _check_disjoint(files, blobs)
    crops, h = [], hashlib.sha256()
    for f, blob in zip(files, blobs):
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise Edge3dfaError(f"unreadable calibration image {f}")
        img = runtime.as_bgr_uint8(img)
        if img.shape[:2] != (runtime.INPUT_SIZE, runtime.INPUT_SIZE):
            if detector is None:
                raise Edge3dfaError(f"{f} is not a 120x120 crop; pass a detector to crop faces from photos")
            boxes = detector(img)
            if not len(boxes):
                continue
            img = cv2.resize(runtime.crop(img, runtime.roi_from_box(boxes[:1])[0]), (120, 120))
        crops.append(img)
        h.update(f.name.encode() + b"\0" + blob)
    if not crops:
        raise Edge3dfaError(f"no face found in any calibration image of {folder}")
    return CalibrationSet(runtime.normalise(np.stack(crops)), str(folder), tuple(f.name for f in files), h.hexdigest())


def crops_of(calibration: CalibrationSet | np.ndarray) -> np.ndarray:
    """The float32 [N,3,120,120] crops of a CalibrationSet or of a plain array (``ndarray.data`` is a buffer,
    so ``getattr(x, "data", x)`` would be wrong for arrays)."""
    return calibration if isinstance(calibration, np.ndarray) else calibration.data


def load_eval_crops(count: int = 64) -> np.ndarray:
    """The first ``count`` AFLW2000-3D crops (protocol order) as network input: for parity, never calibration."""
    folder = assets.fetch("aflw2000_crops")
    names = assets.fetch("aflw2000_crop_list").read_text().split()[:count]
    return runtime.normalise(np.stack([cv2.imread(str(folder / n)) for n in names]))
