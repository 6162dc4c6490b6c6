"""Overlays: 68 landmarks and upstream's pose box (a camera frustum rotated by the head pose)."""

from __future__ import annotations

import cv2
import numpy as np

from edge3dfa.runtime.geometry import rotation

# 68-point contour groups (jaw, brows, nose, eyes, lips) for connected drawing
_GROUPS = [(0, 17, False), (17, 22, False), (22, 27, False), (27, 31, False), (31, 36, False),
           (36, 42, True), (42, 48, True), (48, 60, True), (60, 68, True)]


def pose_box_points(params: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """[10,2] image points of upstream's pose box for one face (de-normalised params [62], landmarks [3,68])."""
    _, r = rotation(params[None])
    t = params[:12].reshape(3, 4)[:, 3]
    x0, y0 = landmarks[0].min(), landmarks[1].min()
    x1, y1 = landmarks[0].max(), landmarks[1].max()
    rear = np.sqrt(2.0) * max(x1 - x0, y1 - y0) / 3  # upstream calc_hypotenuse
    front = int(4 / 3 * rear)
    sq = np.array([(-1, -1), (-1, 1), (1, 1), (1, -1), (-1, -1)], np.float32)
    box = np.concatenate([np.c_[sq * rear, np.zeros(5)], np.c_[sq * front, np.full(5, front)]]).astype(np.float32)
    pts = box @ r[0].T + t
    pts = pts[:, :2] * [1, -1]
    return pts - pts[:4].mean(0) + landmarks[:2, :27].mean(1)


def draw_faces(img: np.ndarray, landmarks: np.ndarray, params: np.ndarray | None = None,
               boxes: np.ndarray | None = None) -> np.ndarray:
    """Copy of ``img`` with each face's landmarks [N,>=2,68], pose box (if params) and detector box drawn."""
    out = img.copy()
    thick = max(1, round(max(img.shape[:2]) / 500))
    # points beyond this are far off the image; clipping them keeps cv2's int32 coordinates valid (a broken
    # model's huge landmarks would wrap around), at the cost of the direction of lines that leave the image
    reach = 4 * max(img.shape[:2])
    for i, lm in enumerate(np.asarray(landmarks)):
        pts = np.round(np.clip(lm[:2].T, -reach, reach)).astype(np.int32)
        for a, b, closed in _GROUPS:
            cv2.polylines(out, [pts[a:b]], closed, (255, 255, 255), thick, cv2.LINE_AA)
        for p in pts:
            cv2.circle(out, (int(p[0]), int(p[1])), thick + 1, (0, 255, 0), -1, cv2.LINE_AA)
        if params is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                q = np.int32(np.clip(pose_box_points(np.asarray(params[i]), lm), -reach, reach))
            cv2.polylines(out, [q], True, (40, 255, 0), thick, cv2.LINE_AA)
            for a, b in ((1, 6), (2, 7), (3, 8)):
                cv2.line(out, tuple(map(int, q[a])), tuple(map(int, q[b])), (40, 255, 0), thick, cv2.LINE_AA)
        if boxes is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in np.clip(boxes[i][:4], -reach, reach))
            cv2.rectangle(out, (x1, y1), (x2, y2), (255, 128, 0), thick)
    return out
