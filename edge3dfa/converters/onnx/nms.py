"""NMS inside an ONNX FaceBoxes bundle: the runtime's rules (``edge3dfa.runtime.detect.FaceBoxesDetector``) as
standard ONNX ops appended to the exported decode graph, so an app gets the final faces from one session call.

The bundle module (``models.bundle.detector_bundle``) ends at every prior's decoded box and face score; torch has
no exportable NMS, so the rest is written here with ``onnx.helper``, one op per rule of the runtime:

- candidates with score > 0.05, the best 5000: ``TopK`` (5000 or every prior) and the score threshold of
  ``NonMaxSuppression`` (strict ``>``, as the runtime);
- greedy NMS at IoU 0.3, the best 750 kept: ``NonMaxSuppression`` (one batch, one class), best score first;
- reported faces score > 0.5: ``Greater`` + ``Compress``.

The +1 pixel: ONNX NMS computes areas and intersections as (x2 - x1) * (y2 - y1); upstream's cpu_nms, which
``runtime.detect.nms`` keeps, adds 1 to each side. Without it a different overlapping candidate often survives in
dense scenes (``benchmarks/detector_bundle_nms.py`` counts how often). The boxes NMS compares are therefore shifted
by +1 at x2 and y2 (the boxes output are not), which gives exactly upstream's areas and intersections, in input
pixels; the runtime adds its pixel in photo pixels, so the two are equal when the photo is not shrunk (at most
480x640 for the default size) and differ by the shrink factor otherwise (the benchmark also compares the faces on
the example photos at several scales; ``measure.parity.detector_bundle_parity`` in every conversion). ONNX also
suppresses at IoU > 0.3 where the runtime suppresses at IoU >= 0.3: different only for an IoU of exactly 0.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge3dfa.runtime import detect as d


def nms_rules() -> str:
    """The rules the graph follows, as the contract's ``nms`` field says them (``bundle.detector_contract``)."""
    return (f"in the model: candidates with score > {d.CONFIDENCE_THRESHOLD:g}, the best {d.TOP_K} (TopK), ONNX "
            f"NonMaxSuppression at IoU {d.NMS_THRESHOLD:g} (suppressed at IoU > {d.NMS_THRESHOLD:g}; upstream's +1 "
            f"pixel areas in input pixels, the runtime's are in photo pixels), the best {d.KEEP_TOP_K}, then score > "
            f"{d.SCORE_THRESHOLD:g}; outputs sorted by score, best first")


def append_nms(model_bytes: bytes, names: Sequence[str] = ("boxes", "scores"), area_pixel: float = 1.0) -> bytes:
    """The serialized decode graph (outputs ``prior_boxes`` [P,4], ``prior_scores`` [P]) with NMS appended: outputs
    ``names`` = (boxes [K,4], scores [K]), best score first. P must be static (a fixed input size).
    ``area_pixel``: added to x2 and y2 of the boxes NMS compares (not of those output); 1 (the default) gives
    upstream's +1 pixel areas and intersections exactly, in input pixels; 0 is the plain ONNX op."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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
        node("TopK", [scores_in, const("top_k", [min(d.TOP_K, priors)], np.int64)],
             ["nms/top_scores", "nms/top_index"], name="/nms/TopK", axis=0, largest=1, sorted=1),
        node("Gather", [boxes_in, "nms/top_index"], ["nms/top_boxes"], name="/nms/GatherBoxes", axis=0),
        node("Add", ["nms/top_boxes", const("area_pixel", [0, 0, area_pixel, area_pixel], np.float32)],
             ["nms/compared_boxes"], name="/nms/AreaPixel"),
        node("Unsqueeze", ["nms/compared_boxes", const("axis0", [0], np.int64)], ["nms/batch_boxes"],
             name="/nms/UnsqueezeBoxes"),
        node("Unsqueeze", ["nms/top_scores", const("axes01", [0, 1], np.int64)], ["nms/batch_scores"],
             name="/nms/UnsqueezeScores"),
        node("NonMaxSuppression", ["nms/batch_boxes", "nms/batch_scores",
                                   const("keep_top_k", [d.KEEP_TOP_K], np.int64),
                                   const("iou", [d.NMS_THRESHOLD], np.float32),
                                   const("candidate_score", [d.CONFIDENCE_THRESHOLD], np.float32)],
             ["nms/selected"], name="/nms/NonMaxSuppression", center_point_box=0),
        node("Gather", ["nms/selected", const("box_column", 2, np.int64)], ["nms/kept"], name="/nms/GatherKept",
             axis=1),
        node("Gather", ["nms/top_boxes", "nms/kept"], ["nms/kept_boxes"], name="/nms/GatherKeptBoxes", axis=0),
        node("Gather", ["nms/top_scores", "nms/kept"], ["nms/kept_scores"], name="/nms/GatherKeptScores", axis=0),
        node("Greater", ["nms/kept_scores", const("score", [d.SCORE_THRESHOLD], np.float32)], ["nms/face"],
             name="/nms/Greater"),
        node("Compress", ["nms/kept_boxes", "nms/face"], [names[0]], name="/nms/CompressBoxes", axis=0),
        node("Compress", ["nms/kept_scores", "nms/face"], [names[1]], name="/nms/CompressScores", axis=0),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["K", 4]),
                         helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["K"])])
    return model.SerializeToString()


def nms_on_given_boxes(priors: int, area_pixel: float = 1.0) -> bytes:
    """A model whose input boxes [priors,4] and scores [priors] go straight into ``append_nms``: the NMS the
    detector bundle appends, alone, on boxes a test or a benchmark chooses (``benchmarks/detector_bundle_nms.py``)."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["prior_boxes"]), helper.make_node("Identity", ["s"], ["prior_scores"])],
        "nms", [helper.make_tensor_value_info("b", TensorProto.FLOAT, [priors, 4]),
                helper.make_tensor_value_info("s", TensorProto.FLOAT, [priors])],
        [helper.make_tensor_value_info("prior_boxes", TensorProto.FLOAT, [priors, 4]),
         helper.make_tensor_value_info("prior_scores", TensorProto.FLOAT, [priors])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return append_nms(model.SerializeToString(), area_pixel=area_pixel)
