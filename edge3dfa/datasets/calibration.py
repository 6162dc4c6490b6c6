"""Calibration sets shared by every converter: real, correctly pre-processed 120x120 face crops.

Two sources: a folder of ready crops (default: the 512 AFLW crops disjoint from AFLW2000-3D), or a folder
of photos run through detector -> roi -> crop. Order is sorted by file name, so a set (and its digest) is
reproducible. An image that is a copy of an AFLW2000-3D crop or photo, in any format, re-encoded, resized or
mirrored, is refused (``converters.overlap``): calibrating on the evaluation set would flatter every int8
figure.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
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


def _check_disjoint(name: Path, img: np.ndarray, crop: np.ndarray) -> None:
    """Refuse an image whose pixels copy the evaluation set: the crop calibration uses against the AFLW2000-3D
    crops; a photo also as a whole, against the crops (resized copies) and the original photos."""
    from edge3dfa.datasets.overlap import reference

    found = reference("aflw2000_crops").match(crop)
    if found is None and img.shape[:2] != crop.shape[:2]:
        found = reference("aflw2000_crops").match(img, exact=False) or reference("aflw2000_original").match(img)
    if found:
        raise Edge3dfaError(f"calibration image {runtime.printable(name)} is {found}; calibrate on images disjoint "
                            "from the evaluation set (default: images/calibration/aflw_gt_crop_disjoint512)")


def load_calibration(folder: str | os.PathLike | None = None, count: int = 256, detector=None,  # noqa: ANN001
                     check_disjoint: bool = True) -> CalibrationSet:
    """The first ``count`` crops from ``folder`` (default: asset ``calibration_crops``) in sorted order.

    Images that are not 120x120 are treated as photos and need ``detector`` (a FaceAligner-compatible
    callable ``img -> boxes [K,5]``); the most confident face of each photo is used, photos without one are
    skipped. Fewer than ``count`` images or faces is an error, never a smaller set than asked for.
    ``check_disjoint=False`` is for callers that use the default folder for something other than
    calibration (held-out scoring, parity figures).
    """
    folder, files = calibration_files(folder, count)
    crops, used, h = [], [], hashlib.sha256()
    for f in files:
        blob = _read_bytes(f)
        try:
            img = runtime.decode_image(blob, f)
        except Edge3dfaError as e:
            raise Edge3dfaError(f"unreadable calibration image: {e}") from None
        crop = img
        if img.shape[:2] != (runtime.INPUT_SIZE, runtime.INPUT_SIZE):
            if detector is None:
                raise Edge3dfaError(f"{runtime.printable(f)} is not a 120x120 crop; pass a detector to crop faces "
                                    "from photos")
            boxes = detector(img)
            if not len(boxes):
                continue
            crop = cv2.resize(runtime.crop(img, runtime.roi_from_box(boxes[:1])[0]), (120, 120))
        if check_disjoint:
            _check_disjoint(f, img, crop)
        crops.append(crop)
        used.append(f.name)
        h.update(os.fsencode(f.name) + b"\0" + blob)
        if len(crops) == count:
            break
    if len(crops) < count:
        raise Edge3dfaError(f"only {len(crops)} of the {len(files)} images in {runtime.printable(folder)} have a "
                            f"face; ask for at most {len(crops)} calibration crops" if crops else
                            f"no face found in any calibration image of {runtime.printable(folder)}")
    return CalibrationSet(runtime.normalise(np.stack(crops)), str(folder), tuple(used), h.hexdigest())


def calibration_files(folder: str | os.PathLike | None, count: object) -> tuple[Path, list[Path]]:
    """The calibration folder (default: asset ``calibration_crops``) and its images in sorted order, after
    checking that ``count`` of them can be asked for (nothing is decoded: cheap enough to run up front). Only
    regular files count, as in ``edge3dfa run``'s folders: reading a named pipe called ``x.jpg`` would never end."""
    folder = Path(folder) if folder is not None else assets.fetch("calibration_crops")
    if not folder.is_dir():
        raise Edge3dfaError(f"calibration folder not found: {runtime.printable(folder)}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                   and p.is_file())
    check_count(count, len(files), folder)
    return folder, files


def check_count(count: object, available: int | None = None, folder: object = "the calibration folder") -> None:
    """A calibration count is a whole number from 1 to the images there are (when known)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise Edge3dfaError(f"calibration count must be a whole number of at least 1, got {count}")
    if available is not None and count > available:
        where = runtime.printable(folder) if isinstance(folder, (str, os.PathLike)) else folder
        raise Edge3dfaError(f"calibration count {count} is more than the {available} images in {where}"
                            if available else f"no images in calibration folder {where}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise Edge3dfaError(f"cannot read calibration image {runtime.printable(path)}: {e.strerror or e}") from None


def crops_of(calibration: CalibrationSet | np.ndarray) -> np.ndarray:
    """The float32 [N,3,120,120] crops of a CalibrationSet or of a plain array (``ndarray.data`` is a buffer,
    so ``getattr(x, "data", x)`` would be wrong for arrays)."""
    return calibration if isinstance(calibration, np.ndarray) else calibration.data


def load_eval_crops(count: int = 64) -> np.ndarray:
    """The first ``count`` AFLW2000-3D crops (protocol order) as network input: for parity, never calibration."""
    folder = assets.fetch("aflw2000_crops")
    names = assets.fetch("aflw2000_crop_list").read_text().split()[:count]
    return runtime.normalise(np.stack([runtime.read_image(folder / n) for n in names]))
