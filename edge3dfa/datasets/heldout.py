"""The calibration crops calibration does not use, scored like 3DDFA's AFLW benchmark (21 points).

The 512 calibration crops are AFLW_GT_crop entries disjoint from AFLW2000-3D, and AFLW publishes 21-point
ground truth, roi boxes and yaws for every one of them. So int8 choices (mixed precision, calibration
options) are made on real ground truth without ever looking at the evaluation set: int8 is calibrated on the
first crops in sorted order and judged on the others, which calibration never sees (``heldout_for``: every
crop of the pool that a calibration set leaves out, all 512 when it calibrates elsewhere).

A judge of int8 candidates needs faces more than anything (per-face ΔNME scatters by far more than the budgets
it judges; ``benchmarks/judge_ranking.py``), hence every crop calibration leaves. Mirrored crops (with mirrored
ground truth) were measured there as a way to get more, and did not keep the ranking: they are not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge3dfa import assets
from edge3dfa.datasets.aflw2000_3d import EvalSet
from edge3dfa.errors import Edge3dfaError

CALIBRATION_POOL = 512  # crops in the shared calibration folder
HELDOUT = 256  # the last crops of it (sorted by name): never used to calibrate by default


def load_heldout(count: int | None = HELDOUT, exclude: Sequence[str] = (),
                 exclude_pixels: np.ndarray | None = None) -> EvalSet:
    """The last ``count`` of the 512 calibration crops not named in ``exclude`` and not equal, pixel for pixel, to
    a crop of ``exclude_pixels`` (network inputs [K,3,120,120]: a copy of the pool, however named) (None: all of
    them), with AFLW 21-point ground truth (-1 = not visible)."""
    from edge3dfa.datasets.calibration import load_calibration

    pool = load_calibration(None, count=CALIBRATION_POOL, check_disjoint=False)  # scored, not calibrated on
    seen = set() if exclude_pixels is None else {x.tobytes() for x in np.asarray(exclude_pixels, np.float32)}
    skip = set(exclude) | {f for f, x in zip(pool.files, pool.data) if x.tobytes() in seen}
    keep = [i for i, f in enumerate(pool.files) if f not in skip]
    count = len(keep) if count is None else count
    if not 1 <= count <= len(keep):
        raise Edge3dfaError(f"held-out count must be 1..{len(keep)} (the {CALIBRATION_POOL} calibration crops "
                            f"less {CALIBRATION_POOL - len(keep)} calibrated on), got {count}")
    keep = keep[-count:]
    names = assets.fetch("aflw_crop_list").read_text().split()
    row = {n: i for i, n in enumerate(names)}
    files = [pool.files[i] for i in keep]
    missing = [f for f in files if f not in row]
    if missing:
        raise Edge3dfaError(f"calibration crops {missing[:3]} are not in AFLW_GT_crop.list: no ground truth")
    idx = np.array([row[f] for f in files], np.int64)
    roi = np.load(assets.fetch("aflw_roi_box")).astype(np.float32)[idx]
    gt = np.load(assets.fetch("aflw_pts21")).astype(np.float32)[idx]
    yaw = np.load(assets.fetch("aflw_yaws")).astype(np.float32).reshape(-1)[idx]
    subset = (f"last {count} of the {CALIBRATION_POOL} calibration crops" if not skip else
              f"{count} of the {CALIBRATION_POOL} calibration crops, none calibrated on")
    return EvalSet("AFLW held-out calibration crops (21 pts)", "crops", "aflw21", tuple(files), idx,
                   pool.data[keep], roi, gt, yaw, source=pool.folder, subset=subset)


def heldout_for(calibration: object) -> EvalSet:
    """Every pool crop that ``calibration`` (a CalibrationSet) does not use: all 512 when it calibrates on other
    images. A crop counts as used when calibration reads it from the pool's folder (however spelt) or holds the
    same pixels (a copy of the pool in another folder, files renamed or not: judging int8 on the crops it was
    calibrated on would flatter it). Plain arrays do not say where they come from: then the default last
    ``HELDOUT``."""
    if not hasattr(calibration, "files"):
        return load_heldout()
    same = Path(calibration.folder).resolve() == Path(assets.fetch("calibration_crops")).resolve()  # however spelt
    return load_heldout(None, calibration.files if same else (), exclude_pixels=calibration.data)
