"""Does a .tflite graph stay on the GPU delegate? LiteRT's model analyzer, and the delegate's own op rules.

* ``analyzer_report``: LiteRT's model analyzer with ``gpu_compatibility=True`` (``ai_edge_litert``'s
  ``_pywrap_analyzer_wrapper``, what ``tf.lite.experimental.Analyzer.analyze`` wraps; TensorFlow is not needed).
  Measured with ai-edge-litert 2.3.0: it answers "looks compatible" for every graph tried, including a lone CAST
  from uint8 and an int32 CUMSUM that TensorFlow's GPU rules reject, so its verdict alone proves nothing
  (``tests/test_bundle_tflite.py`` checks only that the analyzer reads the bundle's signature; the verdict used
  is ``gpu_findings``'s).
* ``gpu_findings``: the per-op rules of TensorFlow's ``tensorflow/lite/tools/versioning/gpu_compatibility.cc``
  (``CheckGpuDelegateCompatibility``, offline mode: enhanced broadcast) for the ops these models use, applied to
  the graph's op types, tensor types, ranks and constness. An op the table here does not know is reported as
  unknown, never as compatible. What neither can tell: whether a given phone's GPU driver runs the kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: ops the GPU delegate takes whatever their tensors (within what these graphs use)
_PLAIN = frozenset({
    "ADD", "MUL", "SUB", "DIV", "CONV_2D", "DEPTHWISE_CONV_2D", "CONCATENATION", "RESHAPE", "TRANSPOSE", "SOFTMAX",
    "RELU", "RELU6", "RELU_N1_TO_1", "HARD_SWISH", "LOGISTIC", "ABS", "SQRT", "EXP", "TANH", "ATAN2", "GREATER",
    "GREATER_EQUAL", "LESS", "LESS_EQUAL", "LOGICAL_AND", "MAXIMUM", "MINIMUM", "MAX_POOL_2D", "AVERAGE_POOL_2D",
    "QUANTIZE", "DEQUANTIZE", "BATCH_MATMUL", "PAD", "PADV2", "PACK", "SPLIT", "SPLIT_V", "NEG", "SQUARE", "RSQRT",
})
_REDUCE = frozenset({"MEAN", "SUM", "REDUCE_MIN", "REDUCE_MAX", "REDUCE_PROD"})
_FLOAT = {np.dtype(np.float32), np.dtype(np.float16)}


def analyzer_report(content: bytes) -> str:
    """LiteRT's model analyzer text for ``content`` with the GPU compatibility check on."""
    from ai_edge_litert import _pywrap_analyzer_wrapper as analyzer

    return analyzer.ModelAnalyzer(bytes(content), False, True)


def _op_problem(name: str, ins: list[dict | None], outs: list[dict]) -> str | None:
    """Why the GPU delegate refuses this op (gpu_compatibility.cc), or None. ``ins``: tensor details with a
    ``const`` flag; None for an absent optional input."""
    live = [t for t in ins if t is not None]
    if name in _PLAIN:
        return None
    if name == "CAST":
        src, dst = live[0]["dtype"], outs[0]["dtype"]
        boolean, f32_i32 = np.dtype(np.bool_), {np.dtype(np.float32), np.dtype(np.int32)}
        ok = ((src == boolean and dst in _FLOAT) or (src in _FLOAT and dst == boolean)
              or (src in f32_i32 and dst in f32_i32))
        return None if ok else f"CAST from {src.name} to {dst.name}"
    if name in ("SLICE", "STRIDED_SLICE"):
        rank = len(live[0]["shape"])
        return None if rank in (3, 4) else f"{name} of a {rank}-D tensor (3-D or 4-D only)"
    if name in _REDUCE:
        axes = live[1] if len(live) > 1 else None
        return None if axes is not None and axes["const"] and axes["dtype"] == np.dtype(np.int32) else \
            f"{name} without constant int32 axes"
    if name == "FULLY_CONNECTED":
        return "FULLY_CONNECTED with a constant input" if live[0]["const"] else None
    if name in ("SELECT", "SELECT_V2"):
        cond, a, b = live[:3]
        if cond["dtype"] not in (_FLOAT | {np.dtype(np.bool_)}) or a["dtype"] not in _FLOAT or b["dtype"] not in _FLOAT:
            return f"{name} on non-float values"
        out = list(outs[0]["shape"])
        for t in (a, b):
            shape = list(t["shape"])
            if shape and shape != out and (len(shape) > 1 or shape[0] > 1):
                return f"{name} with a broadcast branch"
        return None
    return f"{name} (not an op of the GPU delegate)"


def gpu_findings(content: bytes) -> list[tuple[int, str, str]]:
    """(op index, op name, why) for every op the GPU delegate's rules refuse; [] for a fully delegable graph."""
    from edge3dfa.converters.tflite.int8 import _graph_ops, _interpreter

    interp = _interpreter(content)
    details = {t["index"]: t for t in interp.get_tensor_details()}
    consts = _constant_indices(interp)
    out = []
    for op in _graph_ops(interp):
        ins = [None if i < 0 else _spec(details[i], i in consts) for i in op["inputs"]]
        outs = [_spec(details[i], False) for i in op["outputs"]]
        why = _op_problem(op["op_name"], ins, outs)
        if why:
            out.append((int(op["index"]), op["op_name"], why))
    return out


def _spec(detail: dict, const: bool) -> dict:
    return {"dtype": np.dtype(detail["dtype"]), "shape": list(detail["shape"]), "const": const}


def _constant_indices(interp: Any) -> set[int]:
    """Tensor indices no op writes and that are not graph inputs: the model's constants."""
    written = {o for op in interp._get_ops_details() for o in op["outputs"]}  # noqa: SLF001 - read-only walk
    inputs = {d["index"] for d in interp.get_input_details()}
    return {t["index"] for t in interp.get_tensor_details() if t["index"] not in written | inputs}


def summary(findings: list[tuple[int, str, str]]) -> str:
    """One line: each refused op kind once, with how often it occurs."""
    counts: dict[str, int] = {}
    for _, _, why in findings:
        counts[why] = counts.get(why, 0) + 1
    return "; ".join(f"{why} x{n}" if n > 1 else why for why, n in counts.items())
