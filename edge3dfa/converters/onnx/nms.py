"""NMS inside an ONNX FaceBoxes bundle: the runtime's rules (``edge3dfa.runtime.detect.FaceBoxesDetector``) as
standard ONNX ops appended to the exported decode graph, so an app gets the final faces from one session call.

The bundle module (``models.bundle.detector_bundle``) ends at every prior's decoded box and face score; torch has
no exportable NMS, so the rest is written here with ``onnx.helper``, one op per rule of the runtime:

- candidates with score > 0.05, the best 5000: ``TopK`` (5000 or every prior) and the score threshold of
  ``NonMaxSuppression`` (strict ``>``, as the runtime);
- greedy NMS at IoU 0.3, the best 750 kept: ``NonMaxSuppression`` (one batch, one class), best score first;
- reported faces score > 0.5: ``Greater`` + ``Compress``.

Where the op cannot follow the runtime: ONNX NMS computes areas as (x2 - x1) * (y2 - y1), without the +1 pixel of
upstream's cpu_nms that ``runtime.detect.nms`` keeps, and suppresses at IoU > 0.3 where the runtime suppresses at
IoU >= 0.3. Both change which overlapping candidate survives only when two boxes' IoU sits right at the threshold;
``measure.parity.detector_bundle_parity`` measures the effect on the example photos (boxes vs the runtime's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the rules, said in the contract's ``nms`` field (``bundle.detector_contract``)
NMS_RULES = ("in the model: candidates with score > 0.05, the best 5000 (TopK), ONNX NonMaxSuppression at IoU 0.3 "
             "(areas without the runtime's +1 pixel, suppressed at IoU > 0.3), the best 750, then score > 0.5; "
             "outputs sorted by score, best first")


def runtime_rules() -> Any:
    """The runtime's thresholds (``FaceBoxesDetector``'s defaults), read from it rather than copied."""
    from edge3dfa.runtime.detect import FaceBoxesDetector

    return FaceBoxesDetector(forward=lambda blob: (blob, blob))


def append_nms(model_bytes: bytes, names: Sequence[str] = ("boxes", "scores")) -> bytes:
    """The serialized decode graph (outputs ``prior_boxes`` [P,4], ``prior_scores`` [P]) with NMS appended: outputs
    ``names`` = (boxes [K,4], scores [K]), best score first. P must be static (a fixed input size)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rules = runtime_rules()
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    boxes_in, scores_in = (o.name for o in graph.output[:2])
    priors = graph.output[0].type.tensor_type.shape.dim[0].dim_value
    if priors <= 0:
        raise ValueError("append_nms needs a decode graph of static size (the number of priors)")

    def const(name: str, value: Any, dtype: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), f"nms/{name}"))
        return f"nms/{name}"

    node = helper.make_node
    graph.node.extend([
        node("TopK", [scores_in, const("top_k", [min(rules.top_k, priors)], np.int64)],
             ["nms/top_scores", "nms/top_index"], name="/nms/TopK", axis=0, largest=1, sorted=1),
        node("Gather", [boxes_in, "nms/top_index"], ["nms/top_boxes"], name="/nms/GatherBoxes", axis=0),
        node("Unsqueeze", ["nms/top_boxes", const("axis0", [0], np.int64)], ["nms/batch_boxes"],
             name="/nms/UnsqueezeBoxes"),
        node("Unsqueeze", ["nms/top_scores", const("axes01", [0, 1], np.int64)], ["nms/batch_scores"],
             name="/nms/UnsqueezeScores"),
        node("NonMaxSuppression", ["nms/batch_boxes", "nms/batch_scores",
                                   const("keep_top_k", [rules.keep_top_k], np.int64),
                                   const("iou", [rules.nms_threshold], np.float32),
                                   const("candidate_score", [rules.confidence_threshold], np.float32)],
             ["nms/selected"], name="/nms/NonMaxSuppression", center_point_box=0),
        node("Gather", ["nms/selected", const("box_column", 2, np.int64)], ["nms/kept"], name="/nms/GatherKept",
             axis=1),
        node("Gather", ["nms/top_boxes", "nms/kept"], ["nms/kept_boxes"], name="/nms/GatherKeptBoxes", axis=0),
        node("Gather", ["nms/top_scores", "nms/kept"], ["nms/kept_scores"], name="/nms/GatherKeptScores", axis=0),
        node("Greater", ["nms/kept_scores", const("score", [rules.score_threshold], np.float32)], ["nms/face"],
             name="/nms/Greater"),
        node("Compress", ["nms/kept_boxes", "nms/face"], [names[0]], name="/nms/CompressBoxes", axis=0),
        node("Compress", ["nms/kept_scores", "nms/face"], [names[1]], name="/nms/CompressScores", axis=0),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["K", 4]),
                         helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["K"])])
    return model.SerializeToString()
