"""Crop frame -> image pixels, and head pose from the affine camera (upstream utils/tddfa_util, utils/pose)."""

from __future__ import annotations

import numpy as np

from edge3dfa.runtime.bfm import split
from edge3dfa.runtime.preprocess import INPUT_SIZE


def to_image(pts: np.ndarray, roi_boxes: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Upstream ``similar_transform``: vertices [N,3,V] of the crop -> image pixels [N,3,V].

    x -= 1 and z -= 1 (upstream's MATLAB-to-Python shift), y = size - y, then scale/shift by the roi box;
    z is scaled by the mean roi scale and shifted so that each face's minimum depth is 0.
    """
    p = np.array(pts, dtype=np.float32)
    roi = np.asarray(roi_boxes, dtype=np.float32).reshape(-1, 4)
    sx, sy, ex, ey = (roi[:, i, None] for i in range(4))
    scale_x, scale_y = (ex - sx) / size, (ey - sy) / size
    p[:, 0] = (p[:, 0] - 1) * scale_x + sx
    p[:, 1] = (size - p[:, 1]) * scale_y + sy
    p[:, 2] = (p[:, 2] - 1) * (scale_x + scale_y) / 2
    p[:, 2] -= p[:, 2].min(axis=1, keepdims=True)
    return p


def rotation(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """De-normalised params [N,62] -> (scale [N], orthonormal R [N,3,3]) as upstream's ``P2sRt``."""
    r, _, _ = split(params)
    n1 = np.linalg.norm(r[:, 0], axis=1, keepdims=True)
    n2 = np.linalg.norm(r[:, 1], axis=1, keepdims=True)
    r1, r2 = r[:, 0] / n1, r[:, 1] / n2
    return ((n1 + n2) / 2)[:, 0], np.stack([r1, r2, np.cross(r1, r2)], axis=1)


def pose(params: np.ndarray) -> np.ndarray:
    """De-normalised params [N,62] -> [N,3] yaw, pitch, roll in degrees (upstream ``matrix2angle``).

    yaw = asin(R20), pitch = atan2(R21, R22), roll = atan2(R10, R00), with upstream's gimbal-lock branches.
    """
    _, r = rotation(params)
    r20 = r[:, 2, 0]
    yaw = np.arcsin(np.clip(r20, -1, 1))
    c = np.cos(yaw)
    pitch = np.arctan2(r[:, 2, 1] / c, r[:, 2, 2] / c)
    roll = np.arctan2(r[:, 1, 0] / c, r[:, 0, 0] / c)
    up, down = r20 > 0.998, r20 < -0.998
    yaw = np.where(up, np.pi / 2, np.where(down, -np.pi / 2, yaw))
    pitch = np.where(up, np.arctan2(-r[:, 0, 1], -r[:, 0, 2]),
                     np.where(down, np.arctan2(r[:, 0, 1], r[:, 0, 2]), pitch))
    roll = np.where(up | down, 0.0, roll)
    return np.degrees(np.stack([yaw, pitch, roll], axis=1)).astype(np.float32)
