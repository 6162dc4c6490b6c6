"""Evaluation sets: network inputs plus ground truth, ready for ``edge3dfa.validation.metrics``."""

from edge3dfa.validation.datasets.aflw2000_3d import (
    GROUND_TRUTH,
    MODES,
    N_FACES,
    EvalSet,
    load_crops,
    load_pipeline,
    select,
)

__all__ = ["GROUND_TRUTH", "MODES", "N_FACES", "EvalSet", "load_crops", "load_pipeline", "select"]
