"""Every face set edge3dfa reads, in one place: network inputs plus what is needed to score or calibrate.

``calibration`` (face crops for int8, checked disjoint from the evaluation set by ``overlap``), ``heldout``
(the calibration crops int8 never sees, with AFLW 21-point ground truth: where int8 choices are judged) and
``aflw2000_3d`` (the evaluation set, 3DDFA protocol). Converters calibrate on the first, the NME-budget search
judges on the second, validation scores on the third; none of them owns the data.
"""

from edge3dfa.datasets.aflw2000_3d import (
    GROUND_TRUTH,
    MODES,
    N_FACES,
    EvalSet,
    load_crops,
    load_pipeline,
    select,
)

__all__ = ["GROUND_TRUTH", "MODES", "N_FACES", "EvalSet", "load_crops", "load_pipeline", "select"]
