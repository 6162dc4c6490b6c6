"""ONNX int8: static QDQ through onnxruntime's ``quantize_static`` (``Int8Builder``), and dynamic int8.

This module only adds the glue: a CalibrationDataReader over the shared calibration crops, onnxruntime's
calibrators run with histogram sizes ``quantize_static`` cannot pass, the float nodes (``exclude``, the params
layer with ``float_output``, the first layer with ``float_input``, the fused landmark head), and empirical bias
correction. The defaults and why are in ``OnnxOptions``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.converters.onnx.export import bundle_fields, fields, finalise, float_graph, metadata
from edge3dfa.converters.onnx.layers import activations, always_float, attr, layer_sqnr, layer_units, onnx_graph
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError

if TYPE_CHECKING:
    from edge3dfa.converters.onnx import OnnxOptions
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
QUANT_TYPES = {"u8": "QUInt8", "s8": "QInt8"}
#: crops the bias correction measures layer inputs on (the first of the calibration crops)
BIAS_CROPS = 128


class Int8Builder(BaseInt8Builder):
    """The float graph, exported and calibrated once, quantized to static int8 as often as asked.

    ``OnnxFormat.write(precision="int8")`` uses it once; the NME-budget search builds dozens of variants that
    differ only in which ``layers`` stay float, so calibration (the slow part, 5-15 s) is not repeated.
    """

    def __init__(self, source: Checkpoint, options: OnnxOptions, calibration: CalibrationSet | np.ndarray,
                 work: Path) -> None:
        from onnxruntime.quantization import quant_pre_process, quantize_static

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            import onnxruntime

            raise Edge3dfaError(f"onnx int8 needs a newer onnxruntime (quantize_static with calibration_cache_path; "
                                f"tested with 1.32), found {onnxruntime.__version__}")
        self.options, self.detector = options.for_task(source.is_detector), source.is_detector
        self.work, self.meta = Path(work), metadata(source, "int8", self.options)
        self.source = source
        #: a bundle's channel order: its graph takes the uint8 image of the crops (``bundle_feed``); None: a params
        #: graph, which takes the float crops as they are
        self.channels = source.bundle.channels if source.bundle is not None else None
        src = float_graph(source, self.options, self.work)
        if self.options.preprocess:
            src, pre = self.work / "pre.onnx", src
            quant_pre_process(str(pre), str(src), skip_symbolic_shape=False)
        self.src, self.graph = src, onnx_graph(src)  # bias correction changes values, never the graph's nodes
        self.always_float = always_float(self.graph, self.options)
        self.layers = layer_units(self.graph, self.always_float)
        self.cache = calibrate(src, calibration, self.options, self.work, self.channels)
        if self.options.bias_correction:
            probe = self.work / "bias-probe.onnx"
            self.quantize(probe)
            self.src = correct_biases(self.src, probe, crops_of(calibration)[:BIAS_CROPS], self.work, self.channels)
        self._builds = 0

    def quantize(self, dest: Path, keep_float: Sequence[str] = ()) -> list[str]:
        """Write the QDQ model (not finalised) with ``keep_float`` layers float; returns the excluded nodes."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the graph; layers are named by their weighted op, "
                                f"e.g. {', '.join(list(self.layers)[:3])}")
        opts = self.options
        excluded = sorted(set(self.always_float).union(*(self.layers[k] for k in keep_float)))
        quantize_static(str(self.src), str(dest), None, quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                        reduce_range=opts.reduce_range,
                        activation_type=getattr(QuantType, QUANT_TYPES[opts.activations]),
                        weight_type=getattr(QuantType, QUANT_TYPES[opts.weights]),
                        nodes_to_exclude=excluded or None,
                        calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[opts.calib_method]),
                        extra_options={"ActivationSymmetric": opts.activation_symmetric,
                                       "WeightSymmetric": opts.weights == "s8"},
                        calibration_cache_path=str(self.cache))
        return excluded

    def export(self, dest: str | os.PathLike, keep_float: Sequence[str] = ()) -> dict[str, Any]:
        """Write the finished artifact ``dest`` and return its manifest fields (as ``OnnxFormat.write`` does)."""
        self._builds += 1
        tmp = self.work / f"int8-{self._builds}.onnx"
        excluded = self.quantize(tmp, keep_float)
        proto = finalise(tmp, Path(dest), self.meta)
        tmp.unlink()
        if self.channels is not None:
            return bundle_fields(proto, self.source, *static_fields(self.options, excluded))
        out = fields(proto, self.detector, self.options, *static_fields(self.options, excluded))
        if keep_float:
            out["options"]["float_layers"] = list(keep_float)
        return out

    def layer_sqnr(self, quantized: Path, x: np.ndarray) -> dict[str, float]:
        return layer_sqnr(self.layers, self.graph, quantized, self.src, x, self.work, self.channels)


def static_fields(options: OnnxOptions, excluded: list[str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What a static int8 artifact adds to the manifest's options and notes."""
    used = {"quant_format": "QDQ", "calib_method": options.calib_method, "per_channel": options.per_channel,
            "activation_type": QUANT_TYPES[options.activations], "weight_type": QUANT_TYPES[options.weights],
            "reduce_range": options.reduce_range, "activation_symmetric": options.activation_symmetric,
            "quant_pre_process": options.preprocess, "float_output": options.float_output,
            "float_input": options.float_input, "bias_correction": options.bias_correction,
            "excluded_nodes": excluded}
    if options.calib_method == "percentile":
        used.update(percentile=options.percentile, num_bins=options.num_bins)
    elif options.calib_method == "entropy":
        used.update(num_bins=options.num_bins, num_quantized_bins=options.num_quantized_bins)
    notes = ["static int8 QDQ: onnxruntime runs it on int8 kernels; parity '<set> fake-quant' is the same graph "
             "with optimisations off (Q/DQ as float ops), so the difference is kernel error"]
    if options.weights == "s8" and not options.reduce_range and not options.float_input:
        notes.append("x86 CPUs without VNNI (AVX2 only) saturate u8 x s8 products in onnxruntime's fast kernels "
                     "(README \"Int8 within an NME budget\"): for such CPUs reconvert with "
                     "--option weights=u8 --option activations=u8 (exact, but slower) or reduce_range=true, or "
                     "let --nme-budget choose by measurement")
    return used, tuple(notes)


def write_dynamic(source: Checkpoint, dest: Path, options: OnnxOptions, work: Path) -> dict[str, Any]:
    """The dynamic int8 artifact ``dest`` (weights int8, activations quantized at run time); its manifest fields."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    options = options.for_task(source.is_detector)
    src = float_graph(source, options, work)
    if options.preprocess:
        src, fp32 = work / "pre.onnx", src
        quant_pre_process(str(fp32), str(src), skip_symbolic_shape=False)
    graph = onnx_graph(src)
    excluded = always_float(graph, options)
    # the dynamic quantizer first rewrites every Gemm into a MatMul named NAME_MatMul (+ an Add; onnxruntime's
    # ONNXModel.replace_gemm_with_matmul), after reading nodes_to_exclude: an excluded Gemm (the params layer with
    # float_output, a bundle head's MatMul + Add that the pre-processing fused) was quantized all the same
    gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
    excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
    dyn = work / "dyn.onnx"
    # onnxruntime's CPU ConvInteger only has a uint8 x uint8 kernel, so weights are uint8 here.
    quantize_dynamic(str(src), str(dyn), per_channel=options.per_channel, reduce_range=options.reduce_range,
                     weight_type=QuantType.QUInt8, nodes_to_exclude=excluded or None)
    proto = finalise(dyn, dest, metadata(source, "dyn-int8", options))
    used = {"quant_format": "dynamic (ConvInteger/MatMulInteger)", "per_channel": options.per_channel,
            "weight_type": "QUInt8", "reduce_range": options.reduce_range, "float_output": options.float_output,
            "excluded_nodes": excluded}
    note = ("dynamic int8 quantizes activations at run time, which makes these CNNs slower than fp32 on "
            "onnxruntime's CPU provider (benchmarks/onnx_speed.py measures it on a machine); it only saves file "
            "size. Use int8 for speed")
    if source.bundle is not None:
        return bundle_fields(proto, source, used, (note,))
    return fields(proto, source.is_detector, options, used, (note,))


# ------------------------------------------------------------------------------------------- calibration
def equal_batch(count: int, batch: int) -> int:
    """The largest batch size <= ``batch`` that splits ``count`` crops into equal batches.

    onnxruntime's calibrators stack every batch's outputs into one array (``np.asarray`` of the list), which
    fails on a shorter last batch: 33 crops in batches of 32 crashed int8 conversion. The ranges do not depend on
    how the crops are split (the histogram calibrators see all outputs at once; MinMax takes the min/max of the
    per-batch min/max), so any count works with equal batches, at worst of one crop each.
    """
    return max(d for d in range(1, max(1, min(batch, count)) + 1) if count % d == 0) if count > 0 else 1


def graph_input(x: np.ndarray, channels: str | None) -> np.ndarray:
    """Canonical float crops as a graph takes them: a params graph as they are (float32 NCHW), a bundle
    (``channels`` its channel order) as the exact uint8 NHWC crops of its contract (``bundle.to_image_uint8``)."""
    if channels is None:
        return np.ascontiguousarray(x, np.float32)
    from edge3dfa import bundle

    return bundle.to_image_uint8(x, channels)


def calibration_reader(calibration: CalibrationSet | np.ndarray, input_name: str = "input", batch: int = 32,
                       channels: str | None = None) -> Any:
    """An onnxruntime CalibrationDataReader over a CalibrationSet (or crops array), in its reproducible order,
    in equal batches of at most ``batch`` crops (``equal_batch``); for a bundle (``channels`` given) each batch is
    the uint8 image of the crops (``graph_input``)."""
    from onnxruntime.quantization import CalibrationDataReader

    data = crops_of(calibration)
    batch = equal_batch(len(data), batch)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: graph_input(x, channels)}

        def rewind(self) -> None:
            self._it = (data[i:i + batch] for i in range(0, len(data), batch))

        def __len__(self) -> int:
            return -(-len(data) // batch)

    return _Reader()


def calibrate(src: Path, calibration: CalibrationSet | np.ndarray, options: OnnxOptions, work: Path,
              channels: str | None = None) -> Path:
    """Tensor ranges with onnxruntime's own calibrators, saved as its calibration cache.

    Done here rather than inside ``quantize_static`` only because that function cannot pass histogram
    sizes: its Entropy calibrator then keeps 128 bins for 128 quantized levels, a single candidate
    threshold, i.e. exactly MinMax. Bins follow onnxruntime's Percentile/Distribution defaults (2048).
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = getattr(CalibrationMethod, CALIB_METHODS[options.calib_method])
    extra: dict[str, Any] = {}  # range symmetry: onnxruntime's per-method defaults, as quantize_static uses
    if options.calib_method == "entropy":
        extra.update(num_bins=options.num_bins, num_quantized_bins=options.num_quantized_bins)
    elif options.calib_method == "percentile":
        extra.update(num_bins=options.num_bins, percentile=options.percentile)
    calibrator = create_calibrator(src, augmented_model_path=str(work / "augmented.onnx"), calibrate_method=method,
                                   extra_options=extra)
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress; stdout is the CLI's table
        calibrator.collect_data(calibration_reader(calibration, input_name(channels), options.calib_batch, channels))
        ranges = calibrator.compute_data()
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache


# ------------------------------------------------------------------------------------------ bias correction
def input_name(channels: str | None) -> str:
    """The graph input's name: ``bundle.INPUT_NAME`` for a bundle, else the params graph's "input"."""
    from edge3dfa import bundle

    return "input" if channels is None else bundle.INPUT_NAME


def correct_biases(src: Path, quantized: Path, x: np.ndarray, work: Path, channels: str | None = None) -> Path:
    """Empirical bias correction (Nagel et al. 2019): the rounding error of a layer's int8 weights, dW, shifts
    the mean of its output by dW applied to the mean of its (quantized) input, per output channel; that
    shift is subtracted from the float bias, so the quantized layer's output mean matches the float one.

    Only the layer's own weight error is corrected, from its input as the int8 graph ``quantized`` sees it (one
    pass over crops ``x``), not the total error at its output, which also carries the error of the layers
    before it (correcting that at every layer over-corrects: measured +0.1 NME on mb05). Returns the corrected
    float model (in ``work``).
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

    batch = equal_batch(len(x), 16)
    sizes = [batch] * (len(x) // batch)  # as calibration_reader splits x
    acts = activations(quantized, x, work, channels)
    weights = create_weight_matching(str(src), str(quantized))
    qdq_nodes = {n.name: n for n in onnx.load(str(quantized), load_external_data=False).graph.node}
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    corrected = 0
    for node in model.graph.node:
        qnode = qdq_nodes.get(node.name)
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or qnode is None:
            continue
        w = weights.get(node.input[1])
        if w is None or qnode.input[0] not in acts or node.input[2] not in inits:
            continue  # layer kept float, or a graph shape this correction does not know
        bias = numpy_helper.to_array(inits[node.input[2]])
        shift = _bias_shift(node, w["dequantized"] - w["float"], acts[qnode.input[0]], sizes)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(bias.dtype), node.input[2]))
        corrected += 1
    if not corrected:
        raise Edge3dfaError("bias_correction found no quantized Conv/Gemm to correct in this graph")
    out = work / "bias-corrected.onnx"
    onnx.save_model(model, str(out))
    return out


def _bias_shift(node: Any, weight_error: np.ndarray, inputs: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Per output channel: the weight rounding error applied to the mean input of ``node`` (Conv or Gemm)."""
    dw = weight_error.astype(np.float64)
    if node.op_type == "Gemm":
        dw = dw if attr(node, "transB", 0) else dw.T  # [C_out, C_in]
        groups, c_in = 1, dw.shape[1]
    else:  # grouped conv: each output channel sees its group's input channels
        groups = attr(node, "group", 1)
        c_in = dw.shape[1] * groups
    mean_in = np.concatenate([a.reshape(n, c_in, -1) for a, n in zip(inputs, sizes)])
    per_group = mean_in.mean(axis=(0, 2)).reshape(groups, -1)  # [groups, C_in / groups]
    taps = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # [C_out, C_in / groups]
    group_of = np.arange(dw.shape[0]) // (dw.shape[0] // groups)
    return (taps * per_group[group_of]).sum(axis=1)
