"""Image -> faces: detector target + regressor target + the numpy runtime, as it runs on a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge3dfa import runtime
from edge3dfa.errors import Edge3dfaError
from edge3dfa.runtime.bfm import BFM, load_bfm68
from edge3dfa.runtime.detect import FaceBoxesDetector
from edge3dfa.target import Target

FACES_SCHEMA = "edge3dfa.faces/1"  # the per-image JSON of `edge3dfa run` (README "Outputs")

@dataclass
class Faces:
    """Everything found in one image, one row per face."""

    boxes: np.ndarray  # [K,5] detector x1, y1, x2, y2, score (image pixels)
    roi_boxes: np.ndarray  # [K,4] crop boxes
    params: np.ndarray  # [K,62] de-normalised 3DMM params
    landmarks: np.ndarray  # [K,3,68] image pixels (x, y, z)
    pose: np.ndarray  # [K,3] yaw, pitch, roll in degrees
    vertices: np.ndarray | None = None  # [K,3,V] dense mesh in image pixels, when a dense BFM is given

    def __len__(self) -> int:
        return len(self.params)

    def to_json(self) -> list[dict[str, Any]]:
        """One dict per face, rounded to what the model resolves: pixels and degrees to 0.01, the detector score
        to 0.0001, params to float32's 7 significant digits (README "Outputs": fields and units)."""
        keys = ("yaw", "pitch", "roll")
        return [{"box": _rounded(self.boxes[i, :4], 2), "score": round(float(self.boxes[i, 4]), 4),
                 "roi_box": _rounded(self.roi_boxes[i], 2),
                 "landmarks": _rounded(self.landmarks[i].T, 2),
                 "pose_deg": dict(zip(keys, _rounded(self.pose[i], 2))),
                 "params": [float(f"{v:.7g}") for v in self.params[i].tolist()]} for i in range(len(self))]


def _rounded(a: np.ndarray, decimals: int) -> list:
    """Rounded in float64, so JSON shows 119.6, not float32's 119.5999984741211."""
    return np.round(np.asarray(a, np.float64), decimals).tolist()


def stable_order(boxes: np.ndarray) -> np.ndarray:
    """Indices of detections [K,5] by score (to 0.01, so backends whose scores differ in the last digits agree),
    then left to right, then top to bottom: the faces' order in every output."""
    b = np.asarray(boxes, np.float64).reshape(-1, 5)
    return np.lexsort((np.round(b[:, 1], 1), np.round(b[:, 0], 1), -np.round(b[:, 4], 2)))


class FaceAligner:
    """Finds faces and regresses their 3DMM params; the regressor and detector are any :class:`Target`."""

    def __init__(self, regressor: Target, detector: Target | None = None, dense: BFM | None = None,
                 score_threshold: float = 0.5):
        contract = getattr(regressor, "bundle", None)
        if contract and contract.get("kind") != "regressor":  # else its [1,H,W,3] input reads as a wrong crop size
            raise Edge3dfaError(f"{regressor.name} is a {contract.get('kind')} bundle, not a landmark model: "
                                "give it as the detector (--detector)")
        self.regressor = regressor
        # A detector exported at a fixed size (e.g. TFLite) gets every photo shrunk and padded to that size.
        self.detector = (FaceBoxesDetector.of_target(detector, score_threshold=score_threshold) if detector
                         else None)
        self.bfm = load_bfm68()
        self.dense = dense

    def detect(self, img: np.ndarray) -> np.ndarray:
        if self.detector is None:
            raise Edge3dfaError("no face detector configured")
        return self.detector(runtime.as_bgr_uint8(img))

    def align(self, img: np.ndarray, roi_boxes: np.ndarray, boxes: np.ndarray | None = None) -> Faces:
        """Regress faces in given roi boxes [K,4] (from a detector, or from previous landmarks when tracking)."""
        roi_boxes = np.asarray(roi_boxes, np.float32).reshape(-1, 4)
        x = runtime.crops_from_rois(img, roi_boxes)
        params_norm = self.regressor.predict(x) if len(x) else np.zeros((0, 62), np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as one error
            params = runtime.denormalise(params_norm, self.bfm)
            pts = runtime.to_image(runtime.reconstruct(params, self.bfm), roi_boxes)
            dense = runtime.to_image(runtime.reconstruct(params, self.dense), roi_boxes) if self.dense else None
            pose = runtime.pose(params)
        self._check_finite(params_norm, pts, pose)
        if boxes is None:
            boxes = np.c_[roi_boxes, np.ones(len(roi_boxes), np.float32)]
        return Faces(np.asarray(boxes, np.float32), roi_boxes, params, pts, pose, dense)

    def _check_finite(self, params_norm: np.ndarray, pts: np.ndarray, pose: np.ndarray) -> None:
        """Finite but huge params (e.g. 1e30) overflow float32 in the 3DMM: an error naming the regressor."""
        bad = ~(np.isfinite(pts).all(axis=(1, 2)) & np.isfinite(pose).all(axis=1))
        if bad.any():
            raise Edge3dfaError(f"{self.regressor.name}: params out of range (largest |output| "
                                f"{float(np.abs(params_norm).max()):.3g}) give non-finite landmarks or pose for "
                                f"{int(bad.sum())} of {len(bad)} faces; the artifact is broken (re-convert it)")

    def __call__(self, img: np.ndarray) -> Faces:
        """Detect every face, then regress all of them in one batch."""
        img = runtime.as_bgr_uint8(img)
        boxes = self.detect(img)
        boxes = boxes[stable_order(boxes)] if len(boxes) else boxes
        return self.align(img, runtime.roi_from_box(boxes) if len(boxes) else np.zeros((0, 4)), boxes)
