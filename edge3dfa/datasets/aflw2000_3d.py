"""AFLW2000-3D under the 3DDFA protocol, as network inputs plus what is needed to score them.

Two modes. ``crops`` (the protocol): the 2000 published 120x120 crops, in ``AFLW2000-3D_crop.list``
order, mapped back to the original image with the published roi boxes. ``pipeline`` (as on a device):
the original photos through FaceBoxes -> roi -> crop; of the faces found, the one whose box best overlaps
the ground truth's 68-point box is scored, and photos where none overlaps are counted as missed.

A subset of ``samples`` faces is evenly spaced over the list (indices round(linspace(0, 1999, n))), not
the first n: the list is sorted by image name, and a spread subset keeps the yaw mix of the whole set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.errors import Edge3dfaError
from edge3dfa.runtime.detect import box_iou

N_FACES = 2000
#: ground-truth choice -> asset: the original fits, or the re-annotated 2-D landmarks (3DDFA's "re")
GROUND_TRUTH = {"original": "aflw2000_pts68", "reannotated": "aflw2000_reannotated_pts68"}
MODES = ("crops", "pipeline")


@dataclass(frozen=True)
class EvalSet:
    """Network inputs and everything needed to score them, one row per face."""

    name: str  # e.g. "AFLW2000-3D crops"
    mode: str  # crops | pipeline
    ground_truth: str  # original | reannotated
    files: tuple[str, ...]  # image file names
    index: np.ndarray  # [N] row in the protocol order (0..1999)
    inputs: np.ndarray  # float32 [N,3,120,120]
    roi_boxes: np.ndarray  # float32 [N,4] crop box in original image pixels
    gt: np.ndarray  # float32 [N,2,68] landmarks in original image pixels
    yaw: np.ndarray  # float32 [N] degrees
    missed: tuple[str, ...] = field(default=())  # pipeline mode: photos where no detection matched the face
    source: str = ""  # folder the images were read from
    subset: str = "all"  # "all" or "N of 2000, evenly spaced"

    def __len__(self) -> int:
        return len(self.index)

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "ground_truth": self.ground_truth, "count": len(self),
                "subset": self.subset,
                "missed": list(self.missed), "source": self.source}


def select(samples: int | str | None, total: int = N_FACES) -> np.ndarray:
    """Row indices of a deterministic subset: all for None/'all', else ``samples`` evenly spaced rows."""
    if samples is None or (isinstance(samples, str) and samples.lower() == "all"):
        return np.arange(total)
    try:
        n = int(samples)
    except (TypeError, ValueError):
        raise Edge3dfaError(f"samples must be a positive number or 'all', got {samples!r}") from None
    if n < 1:
        raise Edge3dfaError(f"samples must be a positive number or 'all', got {n}")
    if n >= total:
        return np.arange(total)
    return np.unique(np.round(np.linspace(0, total - 1, n)).astype(np.int64))


def _subset(idx: np.ndarray) -> str:
    return "all" if len(idx) == N_FACES else f"{len(idx)} of {N_FACES}, evenly spaced"


def _annotations(ground_truth: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    if ground_truth not in GROUND_TRUTH:
        raise Edge3dfaError(f"unknown ground truth {ground_truth!r}; choose {' or '.join(GROUND_TRUTH)}")
    names = assets.fetch("aflw2000_crop_list").read_text().split()
    roi = np.load(assets.fetch("aflw2000_roi_box")).astype(np.float32)
    gt = np.load(assets.fetch(GROUND_TRUTH[ground_truth])).astype(np.float32)[:, :2]
    yaw = np.load(assets.fetch("aflw2000_pose")).astype(np.float32).reshape(-1)
    if not (len(names) == len(roi) == len(gt) == len(yaw) == N_FACES):
        raise Edge3dfaError(f"AFLW2000-3D annotations disagree in length: list {len(names)}, roi {len(roi)}, "
                            f"ground truth {len(gt)}, pose {len(yaw)} (expected {N_FACES})")
    return names, roi, gt, yaw


def _read(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        raise Edge3dfaError(f"AFLW2000-3D image missing: {path}")
    return runtime.read_image(path)


def _progress(items: Iterable, desc: str, total: int) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, unit="img", leave=False, disable=None)


def load_crops(samples: int | str | None = None, ground_truth: str = "original",
               crops_dir: str | os.PathLike | None = None) -> EvalSet:
    """The protocol's 120x120 crops (default: asset ``aflw2000_crops``, digest-checked) as network input."""
    names, roi, gt, yaw = _annotations(ground_truth)
    folder = Path(crops_dir) if crops_dir is not None else assets.fetch("aflw2000_crops")
    if not folder.is_dir():
        raise Edge3dfaError(f"AFLW2000-3D crops folder not found: {folder}")
    idx = select(samples)
    imgs = []
    for i in _progress(idx, "reading crops", len(idx)):
        img = _read(folder, names[i])
        if img.shape[:2] != (runtime.INPUT_SIZE, runtime.INPUT_SIZE):
            raise Edge3dfaError(f"{folder / names[i]} is {img.shape[1]}x{img.shape[0]}, not a 120x120 crop")
        imgs.append(img)
    return EvalSet("AFLW2000-3D crops", "crops", ground_truth, tuple(names[i] for i in idx), idx,
                   runtime.normalise(np.stack(imgs)), roi[idx], gt[idx], yaw[idx], source=str(folder),
                   subset=_subset(idx))


def load_pipeline(detect: Callable[[np.ndarray], np.ndarray], samples: int | str | None = None,
                  ground_truth: str = "original", images_dir: str | os.PathLike | None = None) -> EvalSet:
    """Original photos -> ``detect`` (img -> boxes [K,5]) -> best-matching face -> roi -> 120x120 crop."""
    names, _, gt, yaw = _annotations(ground_truth)
    folder = Path(images_dir) if images_dir is not None else assets.fetch("aflw2000_original")
    if not folder.is_dir():
        raise Edge3dfaError(f"AFLW2000-3D original images folder not found: {folder}")
    keep, rois, crops, missed = [], [], [], []
    idx = select(samples)
    for i in _progress(idx, "detecting faces", len(idx)):
        img = _read(folder, names[i])
        boxes = np.asarray(detect(img), np.float32).reshape(-1, 5)
        g = gt[i]
        gt_box = np.array([g[0].min(), g[1].min(), g[0].max(), g[1].max()], np.float32)
        overlap = box_iou(boxes[:, :4], gt_box[None])[:, 0] if len(boxes) else np.zeros(0)
        if not len(overlap) or overlap.max() <= 0:
            missed.append(names[i])
            continue
        roi = runtime.roi_from_box(boxes[[int(overlap.argmax())]]).astype(np.float32)
        keep.append(i)
        rois.append(roi[0])
        crops.append(runtime.crops_from_rois(img, roi)[0])
    if not keep:
        raise Edge3dfaError(f"the detector found none of the {len(idx)} faces in {folder}")
    k = np.asarray(keep, np.int64)
    return EvalSet("AFLW2000-3D photos, FaceBoxes crops", "pipeline", ground_truth, tuple(names[i] for i in k), k,
                   np.stack(crops), np.stack(rois), gt[k], yaw[k], missed=tuple(missed), source=str(folder),
                   subset=_subset(idx))
