"""Static int8 TFLite with ai-edge-quantizer: one float flatbuffer, calibrated once, quantized as often as asked.

* Activation ranges start from the global min/max over the calibration set: ai-edge-quantizer's default moving
  average (0.95) lets the last samples set the ranges and clipped outliers (mb05 max param error 2.0 -> 0.2).
  By default each range is then narrowed to the clip of least expected squared quantization error over the
  calibration values (``calib_method="mse"``; ``percentile`` and ``minmax`` are offered): a few extreme values
  otherwise spend most of a tensor's 256 levels. Chosen on the held-out crops, where it was the one choice that
  beat global min/max by more than the paired 95 % interval for both mb05 and MobileNet-V3
  (``benchmarks/tflite_ranges.py``; README "Calibration choices"). ai-edge-quantizer has no such calibration
  (its MSE / OCTAV algorithms choose weight ranges only), so ``clip_ranges`` computes the ranges from histograms
  of the float graph's tensors and hands them over as its min/max statistics. The model's input keeps its
  min/max (the normalised image, whose range is known), and so does the params layer's output when it is int8
  (``io=int8``, ``params_layer=int8``): clipping would cut the extreme poses' parameters, not noise.
* The params layer (the last FULLY_CONNECTED and what follows it) stays float unless ``params_layer="int8"``:
  an int8 params tensor alone costs ~0.6 px on 120x120 crops (README, "Per precision").
* HARD_SWISH stays float unless ``hard_swish="int8"``: XNNPACK has no int8 hard-swish here, and the reference
  kernel made int8 MobileNet-V3 3.7x slower (``benchmarks/int8_speed.py``).
* ``io="int8"`` gives a full-integer graph (int8 params layer and hard-swish too) for integer-only hardware.

``layers`` names each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED like the model's modules (as ONNX's do), so
the NME-budget search can keep any of them float.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa.converters.base import Int8Builder
from edge3dfa.converters.tflite.export import CROP_SIZE, float_flatbuffer, quiet_bars, write_artifact
from edge3dfa.converters.tflite.opversions import inspect_ops
from edge3dfa.datasets.calibration import CalibrationSet, crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import native_output

if TYPE_CHECKING:
    from edge3dfa.converters.tflite import TFLiteOptions
    from edge3dfa.models import Checkpoint

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _interpreter(content: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    with native_output():  # LiteRT's XNNPACK banner on the first interpreter
        return Interpreter(model_content=content)


def _graph_ops(interp: Any) -> list[dict[str, Any]]:
    return interp._get_ops_details()  # noqa: SLF001 - read-only graph walk; LiteRT has no public one


def params_layer_tensors(content: bytes) -> list[str]:
    """Output tensor names from the last weighted op (the params layer) through to the model output."""
    interp = _interpreter(content)
    out = interp.get_output_details()[0]["index"]
    ops = {o: op for op in _graph_ops(interp) for o in op["outputs"]}
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    chain = []
    while out in ops:
        op = ops[out]
        chain.append(names[out])
        if op["op_name"] in ("FULLY_CONNECTED", "CONV_2D"):
            return chain
        out = op["inputs"][0]
    return []


def short_name(tensor: str) -> str:
    """``.../DepthWiseBlock_dw2_1/torch.nn.modules.conv.Conv2d_conv_dw;1`` -> ``dw2_1/conv_dw``: the module
    path of the last scope in a litert-torch tensor name, as attribute names (ONNX's names say the same)."""
    scope = next((p for p in reversed(tensor.split(";")) if p and not p.isdigit()), tensor)
    return "/".join(scope_attributes(scope)[1:]) or scope  # [0] is the wrapped model itself


def scope_attributes(scope: str) -> list[str]:
    """``.../DepthWiseBlock_dw2_1/torch.nn.modules.conv.Conv2d_conv_dw`` -> ``[..., "dw2_1", "conv_dw"]``: the
    attribute name in each ``Class_attribute`` component of one litert-torch scope."""
    return [c.rsplit(".", 1)[-1].split("_", 1)[1] for c in scope.split("/") if "_" in c.rsplit(".", 1)[-1]]


def layer_units(content: bytes, skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Candidate layers for mixed precision, in execution order: each CONV_2D / DEPTHWISE_CONV_2D /
    FULLY_CONNECTED with the ops after it up to the next one; values are the ops' output tensor names."""
    interp = _interpreter(content)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    units: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for op in _graph_ops(interp):
        outs = [names[o] for o in op["outputs"]]
        if any(t in skip for t in outs):
            continue
        if op["op_name"] in _WEIGHTED:
            current = short_name(outs[0])
            while current in units:
                current += "'"
            units[current] = pending
            pending = []
        (units[current] if current else pending).extend(outs)
    return units


def _no_quantize(q: Any, operation: Any, regex: str = ".*") -> None:
    from ai_edge_quantizer import qtyping

    q.update_quantization_recipe(regex=regex, operation_name=operation, op_config=qtyping.OpQuantizationConfig(),
                                 algorithm_key="no_quantize")


def int8_recipe(content: bytes, options: TFLiteOptions, params_layer: list[str], hard_swish: bool,
                float_tensors: list[str]) -> tuple[Any, list[str]]:
    """A Quantizer for static int8 with the ``params_layer`` tensors, hard-swish (as the options say) and the ops
    writing ``float_tensors`` left float, and the notes that say so."""
    from ai_edge_quantizer import qtyping, quantizer

    ops = qtyping.TFLOperationName
    q = quantizer.Quantizer(bytearray(content))
    notes = []
    q.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    if options.io == "float":
        _no_quantize(q, ops.INPUT)
        _no_quantize(q, ops.OUTPUT)
    if options.hard_swish_precision == "float":
        _no_quantize(q, ops.HARD_SWISH)
        if hard_swish:
            notes.append("int8: HARD_SWISH kept float (DEQUANTIZE/QUANTIZE around it): XNNPACK runs no int8 "
                         "hard-swish, and the reference kernel it would fall back to is slower than this")
    if params_layer or float_tensors:
        # ai-edge-quantizer matches an op's scope: its output tensor names, each followed by ";"
        regex = "|".join(f"^{re.escape(name)};" for name in params_layer + float_tensors)
        _no_quantize(q, ops.ALL_SUPPORTED, regex=regex)
    if params_layer:
        notes.append("int8: every op int8 except the params head, kept float (an int8 params tensor alone "
                     "costs landmark accuracy: edge3dfa README, Per precision)")
    else:
        notes.append("int8: full-integer graph" + (" with int8 input and output" if options.io == "int8" else ""))
    return q, notes


def _signature_input(content: bytes) -> tuple[str, str]:
    """(signature key, input name) of the model's one signature ("serving_default" unless a bundle's)."""
    key, sig = next(iter(_interpreter(content).get_signature_list().items()))
    return key, sig["inputs"][0]


def model_input(x: np.ndarray) -> np.ndarray:
    """One calibration sample as the model takes it: an NCHW float crop as NHWC [1,H,W,3]; a bundle's uint8
    NHWC image [H,W,3] as it is."""
    return np.ascontiguousarray(x[None] if x.dtype == np.uint8 else x[None].transpose(0, 2, 3, 1))


def calibrate(content: bytes, q: Any, crops: np.ndarray) -> Any:
    """Tensor ranges of ``q``'s recipe on NCHW ``crops`` (a bundle's: uint8 NHWC images): global min/max over
    the set (see module docstring)."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(q.get_quantization_recipe())
    key, name = _signature_input(content)
    cal = calibrator.Calibrator(bytes(content), num_threads=os.cpu_count() or 1,
                                qsv_update_func=qsv_utils.min_max_update)
    data = [{name: model_input(x)} for x in crops]
    with quiet_bars():
        cal.calibrate({key: data}, rm)
    return cal.get_model_qsvs()


#: histogram bins per tensor for percentile / MSE ranges (over the tensor's calibration min..max)
RANGE_BINS = 4096


def tensor_histograms(content: bytes, qsvs: dict[str, Any], crops: np.ndarray,
                      skip: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Counts of every calibrated tensor's values but the graph input's and ``skip``'s, on NCHW ``crops``, in
    ``RANGE_BINS`` bins over its min..max in ``qsvs``: one more pass of the float graph, every tensor kept."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # LiteRT warns that keeping every tensor is for debugging: it is the point here
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        with native_output():
            interp = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    index = {t["name"]: t["index"] for t in interp.get_tensor_details() if t["index"] != inp}
    bounds = {n: (float(np.min(q["min"])), float(np.max(q["max"]))) for n, q in qsvs.items()
              if n in index and n not in skip}
    bounds = {n: b for n, b in bounds.items() if b[1] > b[0]}
    counts = {n: np.zeros(RANGE_BINS, np.int64) for n in bounds}
    for x in crops:
        interp.set_tensor(inp, model_input(x))
        interp.invoke()
        for n, (lo, hi) in bounds.items():
            counts[n] += np.histogram(interp.get_tensor(index[n]), RANGE_BINS, (lo, hi))[0]
    return counts


def percentile_range(lo: float, hi: float, counts: np.ndarray, percentile: float) -> tuple[float, float]:
    """The range that cuts ``100 - percentile`` % of the values off each side that is not zero (a ReLU output
    keeps its 0), rounded outwards to histogram bins; it always contains 0, as int8 ranges must."""
    edges = np.linspace(lo, hi, len(counts) + 1)
    cum = np.cumsum(counts) / max(int(counts.sum()), 1)
    tail = (100.0 - percentile) / 100.0
    upper = edges[min(int(np.searchsorted(cum, 1.0 - tail)) + 1, len(counts))] if hi > 0 else hi
    lower = edges[int(np.searchsorted(cum, tail))] if lo < 0 else lo
    return min(float(lower), 0.0), max(float(upper), 0.0)


def mse_range(lo: float, hi: float, counts: np.ndarray) -> tuple[float, float]:
    """The range ``(a * lo, a * hi)``, ``a`` in [0.2, 1], of least expected squared error on these values:
    rounding (step^2 / 12 for each value inside) plus clipping (distance to the range for each outside)."""
    edges = np.linspace(lo, hi, len(counts) + 1)
    mid = (edges[:-1] + edges[1:]) / 2
    best = (np.inf, lo, hi)
    for a in np.linspace(0.2, 1.0, 81):
        low, up = lo * a, hi * a
        step = (up - low) / 255
        inside = counts[(mid >= low) & (mid <= up)].sum()
        err = inside * step * step / 12 + float((counts * (np.clip(mid, low, up) - mid) ** 2).sum())
        if err < best[0]:
            best = (err, low, up)
    return float(best[1]), float(best[2])


def clip_ranges(content: bytes, qsvs: dict[str, Any], crops: np.ndarray, options: TFLiteOptions,
                keep: Collection[str] | None = None) -> dict[str, Any]:
    """``qsvs`` (global min/max) with each activation range narrowed as ``options.calib_method`` says (the input
    and the ``keep`` tensors, by default the params layer's, keep their own); minmax returns them as they are."""
    if options.calib_method == "minmax":
        return qsvs
    counts = tensor_histograms(content, qsvs, crops, set(params_layer_tensors(content) if keep is None else keep))
    out = dict(qsvs)
    for name, c in counts.items():
        lo, hi = float(np.min(qsvs[name]["min"])), float(np.max(qsvs[name]["max"]))
        low, up = (percentile_range(lo, hi, c, options.percentile) if options.calib_method == "percentile"
                   else mse_range(lo, hi, c))
        out[name] = {**qsvs[name], "min": np.full_like(qsvs[name]["min"], low),
                     "max": np.full_like(qsvs[name]["max"], up)}
    return out


class TFLiteInt8Builder(Int8Builder):
    """The float flatbuffer, converted and calibrated once, quantized to int8 as often as asked with different
    ``layers`` kept float (the mixed-precision search builds dozens of variants)."""

    def __init__(self, source: Checkpoint, options: TFLiteOptions, calibration: CalibrationSet | np.ndarray,
                 work: Path | None = None) -> None:
        if calibration is None:
            raise Edge3dfaError("int8 needs a calibration set")
        self.options, self.detector = options, source.is_detector
        t0 = time.perf_counter()
        self.content = float_flatbuffer(source.load(), CROP_SIZE)
        self.params_layer = params_layer_tensors(self.content) if options.params_layer_precision == "float" else []
        self.hard_swish = "HARD_SWISH" in inspect_ops(self.content)[1]["ops"]
        self.layers = layer_units(self.content, set(self.params_layer))
        q, _ = self._recipe(())
        crops = crops_of(calibration)
        self.qsvs = clip_ranges(self.content, calibrate(self.content, q, crops), crops, options)
        self.seconds = time.perf_counter() - t0

    def _recipe(self, keep_float: Sequence[str]) -> tuple[Any, list[str]]:
        tensors = [t for k in keep_float for t in self.layers[k]]
        return int8_recipe(self.content, self.options, self.params_layer, self.hard_swish, tensors)

    def export(self, dest: str | os.PathLike, keep_float: Sequence[str] = ()) -> dict[str, Any]:
        """Write ``dest`` with ``keep_float`` layers float; returns its manifest fields (as ``Format.write``)."""
        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the graph; e.g. {', '.join(list(self.layers)[:3])}")
        t0 = time.perf_counter()
        q, notes = self._recipe(keep_float)
        with quiet_bars():
            content = bytes(q.quantize(self.qsvs, enable_progress_report=False).quantized_model)
        fields = self._write(content, Path(dest), notes, self.seconds + time.perf_counter() - t0)
        if keep_float:
            fields["options"]["float_layers"] = list(keep_float)
        return fields

    def _write(self, content: bytes, dest: Path, notes: list[str], seconds: float) -> dict[str, Any]:
        """Write the quantized flatbuffer ``content`` at ``dest``; its manifest fields (a bundle writes its own)."""
        return write_artifact(content, dest, "int8", self.options, self.detector, notes, seconds)
