"""How close an artifact is to the PyTorch reference, in params and in landmark pixels of the crop."""

from __future__ import annotations

import numpy as np

from edge3dfa import runtime
from edge3dfa.measure.predict import predict_all
from edge3dfa.target import Target

_CROP_ROI = np.array([[0, 0, runtime.INPUT_SIZE, runtime.INPUT_SIZE]], np.float32)


def crop_landmarks(params_norm: np.ndarray) -> np.ndarray:
    """Normalised params [N,62] -> 68 landmarks [N,2,68] in 120x120 crop pixels."""
    roi = np.repeat(_CROP_ROI, len(params_norm), axis=0)
    return runtime.landmarks(params_norm, roi)[:, :2]


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max/mean abs error of normalised params and max/mean 2-D landmark distance in crop pixels."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    d = np.abs(ref - cand)
    px = np.linalg.norm(crop_landmarks(ref) - crop_landmarks(cand), axis=1)  # [N,68]
    return {"param_max_abs": float(d.max()), "param_mean_abs": float(d.mean()),
            "landmark_max_px": float(px.max()), "landmark_mean_px": float(px.mean()), "n": int(len(ref))}


def parity(reference: Target, candidate: Target, sets: dict[str, np.ndarray]) -> dict[str, dict]:
    """``compare`` on each named input set (e.g. ``{"calibration": ..., "aflw2000": ...}``)."""
    return {name: compare(predict_all(reference, x), predict_all(candidate, x)) for name, x in sets.items()}
