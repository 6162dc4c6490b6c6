"""The held-out half of the calibration crops, scored like 3DDFA's AFLW benchmark (21 points).

The 512 calibration crops are AFLW_GT_crop entries disjoint from AFLW2000-3D, and AFLW publishes 21-point
ground truth, roi boxes and yaws for every one of them. So int8 choices (mixed precision, calibration
options) are made on real ground truth without ever looking at the evaluation set: int8 is calibrated on the
first crops in sorted order and judged on the last ``HELDOUT`` ones, which calibration never sees.
"""

from __future__ import annotations

import numpy as np

from edge3dfa import assets
from edge3dfa.datasets.aflw2000_3d import EvalSet
from edge3dfa.errors import Edge3dfaError

CALIBRATION_POOL = 512  # crops in the shared calibration folder
HELDOUT = 256  # the last crops of it (sorted by name): never used to calibrate by default


def load_heldout(count: int = HELDOUT) -> EvalSet:
    """The last ``count`` of the 512 calibration crops, with AFLW 21-point ground truth (-1 = not visible)."""
    from edge3dfa.datasets.calibration import load_calibration

    if not 1 <= count <= CALIBRATION_POOL:
        raise Edge3dfaError(f"held-out count must be 1..{CALIBRATION_POOL}, got {count}")
    pool = load_calibration(None, count=CALIBRATION_POOL, check_disjoint=False)  # scored, not calibrated on
    names = assets.fetch("aflw_crop_list").read_text().split()
    row = {n: i for i, n in enumerate(names)}
    files = pool.files[-count:]
    missing = [f for f in files if f not in row]
    if missing:
        raise Edge3dfaError(f"calibration crops {missing[:3]} are not in AFLW_GT_crop.list: no ground truth")
    idx = np.array([row[f] for f in files], np.int64)
    roi = np.load(assets.fetch("aflw_roi_box")).astype(np.float32)[idx]
    gt = np.load(assets.fetch("aflw_pts21")).astype(np.float32)[idx]
    yaw = np.load(assets.fetch("aflw_yaws")).astype(np.float32).reshape(-1)[idx]
    return EvalSet("AFLW held-out calibration crops (21 pts)", "crops", "aflw21", tuple(files), idx,
                   pool.data[-count:], roi, gt, yaw, source=pool.folder,
                   subset=f"last {count} of the {CALIBRATION_POOL} calibration crops")
