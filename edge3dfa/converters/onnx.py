"""PyTorch -> ONNX (fp32, static int8 QDQ, dynamic int8) for the regressors and FaceBoxes.

Export uses the TorchScript exporter (``dynamo=False``) by default: on these CNNs it gives the cleanest
graph (BN folded into Conv at export, GlobalAveragePool + Flatten, module-path node names such as
``/dw5_1/conv_sep/Conv`` that ``exclude=`` can name), byte-identical bytes run to run, in 1-2 s instead
of 4-20 s. ``exporter="dynamo"`` is offered (same parity; opaque node names). Then onnxruntime's offline
*basic* optimisation (the one level that only emits standard ONNX ops) folds the scalar Constant nodes into
initializers, so the file is what onnxruntime would build at load time anyway, and what
``quant_pre_process`` would produce; no extra dependency (onnxslim) is needed for these graphs.

int8 is onnxruntime's ``quantize_static`` (QDQ, per-channel weights); this module only adds the glue:
a CalibrationDataReader over the shared CalibrationSet, onnxruntime's calibrators run with histogram sizes
``quantize_static`` cannot pass, option parsing, ``exclude=`` checking, keeping the params layer float
(``float_output``) and the fused landmark head (``head="landmarks"``), whose nodes are never quantized.
Defaults were chosen by measurement (see ``DEFAULTS``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge3dfa import __version__, runtime
from edge3dfa.converters.base import Format
from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import temp_folder
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
from edge3dfa.options import Options, option

PRECISIONS = ("fp32", "int8", "dyn-int8")
SUFFIX = ".onnx"
OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
HEADS = ("params", "landmarks")
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ACTIVATIONS = {"u8": "QUInt8", "s8": "QInt8"}
#: Chosen by measurement (500 AFLW2000-3D crops, 256 calibration crops, mean landmark px vs PyTorch, mb05 / mbv3
#: fixture): percentile 0.265 / 0.343, minmax 0.340 / 0.389, entropy 1.08-1.2 / 1.5 (and 10-30x slower);
#: reduce_range costs 0.1-0.2 px; s8 (asymmetric) = u8 here (AVX-512 VNNI: int8 kernels = fake-quant), and s8
#: was measured far better than u8 on an AVX2 CPU without VNNI (earlier run), so s8; symmetric s8 0.45 / 0.54;
#: per-tensor weights 0.85 / 0.36; quantizing the params layer too 0.94 / 0.84 (hence float_output).
#: float_input keeps the first conv (and its activation) float: its input is the full-range image, whose u8 x s8
#: products saturate onnxruntime's AVX2 kernels on x86 without VNNI (mb05: 1.04 px -> 0.26 px there, = fake-quant),
#: for ~3 % of the MACs; found by the --nme-budget sensitivity search, which ranked this layer first by far.
DEFAULTS: dict[str, Any] = {"calib_method": "percentile", "activations": "s8", "weights": "s8", "reduce_range": False,
                            "per_channel": True, "activation_symmetric": False, "preprocess": True,
                            "float_output": True, "float_input": True, "bias_correction": False}
#: what --nme-budget tries (with the defaults' float layers); the fastest within budget wins, else the fastest gets
#: layers kept float. Measured on x86 without VNNI (AVX2): u8 x s8 kernels saturate where inputs are dense
#: (reduce_range, 7-bit weights, avoids it at some accuracy; u8 x u8 is exact but slow); MobileNet-V3's
#: elementwise ops (hard-swish, SE, residual) only get fused int8 kernels with u8 activations: 1.0 ms vs 5.6 ms
#: for s8 (mbv3 fixture, batch 1, one thread), at +0.10 NME from saturation that float layers can buy back.
INT8_CANDIDATES: dict[str, dict[str, Any]] = {"s8": {}, "u8s8": {"activations": "u8"},
                                              "reduce_range": {"reduce_range": True},
                                              "u8u8": {"weights": "u8", "activations": "u8"}}
OPTIONS = {"exporter", "opset", "head", "exclude", "percentile", "num_bins", "num_quantized_bins", "calib_batch",
           *DEFAULTS}
HEAD_PREFIX = "/head/"  # node-name prefix of the fused landmark head (kept in float)
# First onnxruntime release implementing each ONNX opset (onnxruntime docs, compatibility matrix).
_ORT_FOR_OPSET = {13: "1.7", 14: "1.8", 15: "1.9", 16: "1.11", 17: "1.13", 18: "1.14", 19: "1.15",
                  20: "1.17", 21: "1.18"}
_ORT_FOR_IR = {7: "1.7", 8: "1.11", 9: "1.15", 10: "1.18"}


# ---------------------------------------------------------------------------------------------- options
def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise Edge3dfaError(f"onnx option {key} must be true or false, got {value!r}")


def _whole(key: str, value: Any) -> int:
    """A whole number (17, 17.0, "17"); 17.5 or true are errors, not silently 17 or 1."""
    whole = (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
             or (isinstance(value, str) and value.strip().isdigit()))
    if isinstance(value, bool) or not whole:
        raise Edge3dfaError(f"onnx option {key} must be a whole number, got {value!r}")
    return int(value)


def _choice(key: str, value: Any, allowed: Any) -> str:
    v = str(value).lower().replace("_", "-")
    if v not in allowed:
        raise Edge3dfaError(f"onnx option {key}={value!r} is not one of {', '.join(allowed)}")
    return v


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validated export options with defaults filled in; unknown keys are a user error."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise Edge3dfaError(f"unknown onnx option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}")
    o = {**DEFAULTS, "exporter": "torchscript", "opset": OPSET, "head": "params", "exclude": [],
         "percentile": 99.999, "num_bins": 2048, "num_quantized_bins": 128, "calib_batch": 32, **options}
    o["exporter"] = _choice("exporter", o["exporter"], EXPORTERS)
    o["head"] = _choice("head", o["head"], HEADS)
    o["calib_method"] = _choice("calib_method", o["calib_method"], CALIB_METHODS)
    o["activations"] = _choice("activations", o["activations"], ACTIVATIONS)
    o["weights"] = _choice("weights", o["weights"], ACTIVATIONS)
    for key in ("reduce_range", "per_channel", "activation_symmetric", "preprocess", "float_output", "float_input",
                "bias_correction"):
        o[key] = _bool(key, o[key])
    for key in ("opset", "calib_batch", "num_bins", "num_quantized_bins"):
        o[key] = _whole(key, o[key])
    try:
        o["percentile"] = float(o["percentile"])
    except (TypeError, ValueError):
        raise Edge3dfaError(f"onnx option percentile must be a number, got {o['percentile']!r}") from None
    if o["calib_batch"] < 1 or not 128 <= o["num_quantized_bins"] < o["num_bins"]:
        raise Edge3dfaError("onnx options: calib_batch >= 1 and 128 <= num_quantized_bins < num_bins")
    top = 20 if o["exporter"] == "torchscript" else 21  # the TorchScript exporter stops at opset 20
    if not 17 <= o["opset"] <= top:
        raise Edge3dfaError(f"onnx option opset={o['opset']}: the {o['exporter']} exporter supports 17..{top}")
    if not 50.0 < o["percentile"] <= 100.0:
        raise Edge3dfaError(f"onnx option percentile={o['percentile']}: must be in (50, 100]")
    exclude = o["exclude"]
    if isinstance(exclude, str):
        exclude = [n.strip() for n in exclude.split(",") if n.strip()]
    o["exclude"] = sorted(set(map(str, exclude or [])))
    return o


def check_options(precision: str, detector: bool, options: dict[str, Any]) -> None:
    """Unknown keys and bad values as user errors, before anything is converted (``convert`` asks every format)."""
    parse_options(options)


# ------------------------------------------------------------------------------------------ torch -> onnx
def landmark_head_module(model: Any) -> Any:
    """``model`` followed by de-normalisation and the 68-point reconstruction: [N,3,120,120] -> [N,3,68].

    Output is in 120x120 crop pixels exactly as ``runtime.to_image(reconstruct(denormalise(p)), [0,0,120,120])``:
    x - 1, 120 - y, z - 1 shifted so each face's minimum depth is 0. De-normalisation of alpha is folded
    into the bases (one MatMul); the camera's de-normalisation, y flip and offsets into one Mul + Add.
    """
    import torch

    bfm = runtime.load_bfm68()
    size = float(runtime.INPUT_SIZE)
    flip = np.array([1.0, -1.0, 1.0])[:, None]
    cam_std = (bfm.param_std[:12].reshape(3, 4) * flip).astype(np.float64)
    cam_mean = bfm.param_mean[:12].reshape(3, 4) * flip
    cam_mean = cam_mean + np.array([[0, 0, 0, -1.0], [0, 0, 0, size], [0, 0, 0, -1.0]])
    std_a, mean_a = bfm.param_std[12:].astype(np.float64), bfm.param_mean[12:].astype(np.float64)
    w = bfm.w.astype(np.float64)  # [50, 204]
    w_fold = std_a[:, None] * w
    u_fold = bfm.u.astype(np.float64) + mean_a @ w

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a, np.float32))

    class LandmarkHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cam_std", t(cam_std.reshape(1, 3, 4)))
            self.register_buffer("cam_mean", t(cam_mean.reshape(1, 3, 4)))
            self.register_buffer("w", t(w_fold))
            self.register_buffer("u", t(u_fold))

        def forward(self, p: torch.Tensor) -> torch.Tensor:
            cam = p[:, :12].reshape(-1, 3, 4) * self.cam_std + self.cam_mean
            shape = (p[:, 12:] @ self.w + self.u).reshape(-1, 68, 3).transpose(1, 2)  # [N,3,68]
            pts = cam[:, :, :3] @ shape + cam[:, :, 3:]
            z = pts[:, 2:] - pts[:, 2:].amin(dim=2, keepdim=True)
            return torch.cat([pts[:, :2], z], dim=1)

    class WithLandmarks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.head = LandmarkHead()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

    return WithLandmarks().eval()


def _torch_to_onnx(model: Any, detector: bool, head: str, exporter: str, opset: int) -> bytes:
    import torch

    if head == "landmarks":
        model = landmark_head_module(model)
    outputs = ["loc", "conf"] if detector else ["landmarks" if head == "landmarks" else "params"]
    shape = (1, 3, 480, 640) if detector else (1, 3, runtime.INPUT_SIZE, runtime.INPUT_SIZE)
    dummy = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; we chose it on purpose
        if exporter == "torchscript":
            axes = {"input": {0: "N", 2: "H", 3: "W"} if detector else {0: "N"}}
            axes.update({o: {0: "N", 1: "P"} if detector else {0: "N"} for o in outputs})
            buf = io.BytesIO()
            torch.onnx.export(model.eval(), (dummy,), buf, input_names=["input"], output_names=outputs,
                              opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True)
            return buf.getvalue()
        dims = {0: torch.export.Dim("N", min=1)}
        if detector:
            dims.update({2: torch.export.Dim("H", min=32, max=8192), 3: torch.export.Dim("W", min=32, max=8192)})
        prog = torch.onnx.export(model.eval(), (dummy,), input_names=["input"], output_names=outputs,
                                 opset_version=opset, dynamo=True, dynamic_shapes=({**dims},), optimize=True,
                                 verbose=False, report=False)
        return prog.model_proto.SerializeToString()


def _ort_basic_optimise(src: Path, dest: Path) -> None:
    """onnxruntime's offline basic-level optimisation (constant folding, redundant nodes; standard ops only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dest)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def _finalise(src: Path, dest: Path, meta: dict[str, str]) -> Any:
    """Prune the unused opset domains onnxruntime adds, stamp metadata, check, save as ONE file."""
    import onnx

    model = onnx.load(str(src))
    used = {n.domain for n in model.graph.node} | {""}
    keep = [op for op in model.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    model.producer_name, model.producer_version = "edge3dfa", __version__
    model.doc_string = "3DDFA_V2 converted by edge3dfa; see the manifest .json beside this file"
    del model.metadata_props[:]
    for k, v in sorted(meta.items()):
        model.metadata_props.add(key=f"edge3dfa.{k}", value=str(v))
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(dest), save_as_external_data=False)
    return model


# --------------------------------------------------------------------------------------------- quantize
def equal_batch(count: int, batch: int) -> int:
    """The largest batch size <= ``batch`` that splits ``count`` crops into equal batches.

    onnxruntime's calibrators stack every batch's outputs into one array (``np.asarray`` of the list), which
    fails on a shorter last batch: 33 crops in batches of 32 crashed int8 conversion. The ranges do not depend on
    how the crops are split (the histogram calibrators see all outputs at once; MinMax takes the min/max of the
    per-batch min/max), so any count works with equal batches, at worst of one crop each.
    """
    return max(d for d in range(1, max(1, min(batch, count)) + 1) if count % d == 0) if count > 0 else 1


def calibration_reader(calibration: Any, input_name: str = "input", batch: int = 32) -> Any:
    """An onnxruntime CalibrationDataReader over a CalibrationSet (or crops array), in its reproducible order,
    in equal batches of at most ``batch`` crops (``equal_batch``)."""
    from onnxruntime.quantization import CalibrationDataReader

    data = crops_of(calibration)
    batch = equal_batch(len(data), batch)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: np.ascontiguousarray(x, np.float32)}

        def rewind(self) -> None:
            self._it = (data[i:i + batch] for i in range(0, len(data), batch))

        def __len__(self) -> int:
            return -(-len(data) // batch)

    return _Reader()


_WEIGHTED = {"Conv", "Gemm", "MatMul"}


def float_tail(graph: Any, head_prefix: str = HEAD_PREFIX) -> list[str]:
    """Nodes from the params tensor back to (and including) the last weighted op: the regression output.

    Quantizing that output to 8 bits per tensor costs more than everything else together (mb05: mean
    landmark error 0.98 px -> 0.34 px when only this Gemm stays float) and clips params outside the
    calibration range; in float it costs one tiny Gemm/1x1 Conv.
    """
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    head = [n for n in graph.node if n.name.startswith(head_prefix)]
    if head:  # fused landmark head: the params tensor is what the head reads from the network
        tensor = next(i for n in head for i in n.input
                      if i in producer and not producer[i].name.startswith(head_prefix))
    else:
        tensor = graph.output[0].name
    tail: list[str] = []
    while tensor in producer and len(tail) < 8:
        node = producer[tensor]
        tail.append(node.name)
        if node.op_type in _WEIGHTED and any(i in inits for i in node.input[1:]):
            return tail
        tensor = node.input[0]
    return []  # no weighted op near the output: nothing to keep in float


def _check_exclude(graph: Any, names: list[str], o: dict[str, Any]) -> list[str]:
    """``exclude`` must name nodes of this graph (a typo would silently quantize everything); adds the
    fused head and, with ``float_output`` / ``float_input``, the output layer / the first layer."""
    nodes = [n.name for n in graph.node]
    for name in names:
        if name not in nodes:
            close = difflib.get_close_matches(name, nodes, n=3) or nodes[:3]
            raise Edge3dfaError(f"exclude: no node named {name!r} in the graph; e.g. {', '.join(close)}")
    out = set(names) | {n for n in nodes if n.startswith(HEAD_PREFIX)}
    if o["float_output"]:
        out |= set(float_tail(graph))
    if o["float_input"]:
        out |= set(next(iter(layer_units(graph).values()), []))
    return sorted(out)


def _calibrate(src: Path, calibration: Any, o: dict[str, Any], work: Path) -> Path:
    """Tensor ranges with onnxruntime's own calibrators, saved as its calibration cache.

    Done here rather than inside ``quantize_static`` only because that function cannot pass histogram
    sizes: its Entropy calibrator then keeps 128 bins for 128 quantized levels, a single candidate
    threshold, i.e. exactly MinMax. Bins follow onnxruntime's Percentile/Distribution defaults (2048).
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = getattr(CalibrationMethod, CALIB_METHODS[o["calib_method"]])
    extra: dict[str, Any] = {}  # range symmetry: onnxruntime's per-method defaults, as quantize_static uses
    if o["calib_method"] == "entropy":
        extra.update(num_bins=o["num_bins"], num_quantized_bins=o["num_quantized_bins"])
    elif o["calib_method"] == "percentile":
        extra.update(num_bins=o["num_bins"], percentile=o["percentile"])
    calibrator = create_calibrator(src, augmented_model_path=str(work / "augmented.onnx"), calibrate_method=method,
                                   extra_options=extra)
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress; stdout is the CLI's table
        calibrator.collect_data(calibration_reader(calibration, "input", o["calib_batch"]))
        ranges = calibrator.compute_data()
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache


def layer_units(graph: Any, skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Candidate layers for mixed precision, in graph order: each weighted op (Conv/Gemm/MatMul) with the
    elementwise ops after it up to the next weighted op (activation, hard-swish, SE multiply, residual Add).

    Keeping a layer float excludes all of its nodes, so no quantize/dequantize pair is left between a float
    op and its activation. Nodes in ``skip`` (already float) and the fused head are not candidates.
    """
    inits = {i.name for i in graph.initializer}
    units: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for n in graph.node:
        if n.name in skip or n.name.startswith(HEAD_PREFIX):
            continue
        if n.op_type in _WEIGHTED and any(i in inits for i in n.input[1:]):
            current = n.name
            units[current] = pending
            pending = []
        (units[current] if current else pending).append(n.name)
    return units


class Int8Builder(BaseInt8Builder):
    """The float graph, exported and calibrated once, quantized to static int8 as often as asked.

    ``export(precision="int8")`` uses it once; the mixed-precision search builds dozens of variants that
    differ only in which ``layers`` stay float, so calibration (the slow part, 5-15 s) is not repeated.
    """

    def __init__(self, model: Any, *, source: Any, calibration: Any, work: Path, **options: Any) -> None:
        from onnxruntime.quantization import quant_pre_process, quantize_static

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            import onnxruntime

            raise Edge3dfaError(f"onnx int8 needs a newer onnxruntime (quantize_static with calibration_cache_path; "
                                f"tested with 1.32), found {onnxruntime.__version__}")
        self.o, self.detector = _checked("int8", options, source, calibration)
        self.work, self.meta = Path(work), _meta(source, "int8", self.o, self.detector)
        src = _float_graph(model, self.detector, self.o, self.work)
        if self.o["preprocess"]:
            src, pre = self.work / "pre.onnx", src
            quant_pre_process(str(pre), str(src), skip_symbolic_shape=False)
        self.src, self.graph = src, onnx_graph(src)  # bias correction changes values, never the graph's nodes
        self.always_float = _check_exclude(self.graph, self.o["exclude"], self.o)
        self.layers = layer_units(self.graph, set(self.always_float))
        self.cache = _calibrate(src, calibration, self.o, self.work)
        if self.o["bias_correction"]:
            self.src = self._correct_biases(calibration)
        self._builds = 0

    def _correct_biases(self, calibration: Any, count: int = 128) -> Path:
        """Empirical bias correction (Nagel et al. 2019): the rounding error of a layer's int8 weights, dW, shifts
        the mean of its output by dW applied to the mean of its (quantized) input, per output channel; that
        shift is subtracted from the float bias, so the quantized layer's output mean matches the float one.

        Only the layer's own weight error is corrected, from its input as the int8 graph sees it (one pass
        over calibration crops), not the total error at its output, which also carries the error of the
        layers before it (correcting that at every layer over-corrects: measured +0.1 NME on mb05).
        """
        import onnx
        from onnx import numpy_helper
        from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

        qdq = self.work / "bias-probe.onnx"
        self.quantize(qdq)
        x = crops_of(calibration)[:count]
        sizes = [equal_batch(len(x), 16)] * (len(x) // equal_batch(len(x), 16))  # as calibration_reader splits x
        acts = _activations(qdq, x, self.work)
        weights = create_weight_matching(str(self.src), str(qdq))
        qdq_nodes = {n.name: n for n in onnx.load(str(qdq), load_external_data=False).graph.node}
        model = onnx.load(str(self.src))
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
            dw = (w["dequantized"] - w["float"]).astype(np.float64)
            if node.op_type == "Gemm":
                dw = dw if _attr(node, "transB", 0) else dw.T  # [C_out, C_in]
                groups, c_in = 1, dw.shape[1]
            else:  # grouped conv: each output channel sees its group's input channels
                groups = _attr(node, "group", 1)
                c_in = dw.shape[1] * groups
            mean_in = np.concatenate([a.reshape(n, c_in, -1) for a, n in zip(acts[qnode.input[0]], sizes)])
            per_group = mean_in.mean(axis=(0, 2)).reshape(groups, -1)  # [groups, C_in / groups]
            taps = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # [C_out, C_in / groups]
            group_of = np.arange(dw.shape[0]) // (dw.shape[0] // groups)
            shift = (taps * per_group[group_of]).sum(axis=1)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(bias.dtype), node.input[2]))
            corrected += 1
        if not corrected:
            raise Edge3dfaError("bias_correction found no quantized Conv/Gemm to correct in this graph")
        out = self.work / "bias-corrected.onnx"
        onnx.save_model(model, str(out))
        return out

    def quantize(self, dest: Path, keep_float: Any = ()) -> list[str]:
        """Write the QDQ model (not finalised) with ``keep_float`` layers float; returns the excluded nodes."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the graph; layers are named by their weighted op, "
                                f"e.g. {', '.join(list(self.layers)[:3])}")
        o = self.o
        excluded = sorted(set(self.always_float).union(*(self.layers[k] for k in keep_float)))
        quantize_static(str(self.src), str(dest), None, quant_format=QuantFormat.QDQ, per_channel=o["per_channel"],
                        reduce_range=o["reduce_range"],
                        activation_type=getattr(QuantType, ACTIVATIONS[o["activations"]]),
                        weight_type=getattr(QuantType, ACTIVATIONS[o["weights"]]), nodes_to_exclude=excluded or None,
                        calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[o["calib_method"]]),
                        extra_options={"ActivationSymmetric": o["activation_symmetric"],
                                       "WeightSymmetric": o["weights"] == "s8"},
                        calibration_cache_path=str(self.cache))
        return excluded

    def export(self, dest: str | os.PathLike, keep_float: Any = ()) -> dict[str, Any]:
        """Write the finished artifact ``dest`` and return its manifest fields (as ``export`` does)."""
        self._builds += 1
        tmp = self.work / f"int8-{self._builds}.onnx"
        excluded = self.quantize(tmp, keep_float)
        proto = _finalise(tmp, Path(dest), self.meta)
        tmp.unlink()
        fields = _fields("int8", self.o, self.detector, excluded, proto)
        if keep_float:
            fields["options"]["float_layers"] = list(keep_float)
        return fields

    def layer_sqnr(self, quantized: Path, x: np.ndarray) -> dict[str, float]:
        return _layer_sqnr(self, quantized, x)


def _layer_sqnr(builder: Int8Builder, quantized: Path, x: np.ndarray) -> dict[str, float]:
    """SQNR (dB) of each layer's output in ``quantized`` against the float graph, on crops ``x``
    (onnxruntime's qdq_loss_debug: both graphs run with optimisations off, every tensor kept)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    qdq, flt = (_activations(p, x, builder.work) for p in (quantized, builder.src))
    errors = compute_activation_error(create_activation_matching(qdq, flt))
    out_of = {n.name: n.output[0] for n in builder.graph.node}
    result = {}
    for layer, nodes in builder.layers.items():
        tensor = out_of.get(nodes[-1])
        if tensor in errors and "xmodel_err" in errors[tensor]:
            result[layer] = float(errors[tensor]["xmodel_err"])
    return result


def _activations(model: Path, x: np.ndarray, work: Path) -> dict[str, list[np.ndarray]]:
    """Every float tensor of ``model`` on crops ``x`` (16 per run, flattened per run), by tensor name: onnxruntime's
    qdq_loss_debug, which runs the graph with optimisations off, so a QDQ graph computes as fake-quant."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    aug = work / f"{model.stem}-debug.onnx"
    modify_model_output_intermediate_tensors(str(model), str(aug))
    try:
        return collect_activations(str(aug), calibration_reader(x, "input", 16))
    finally:
        aug.unlink()


def _attr(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def onnx_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _quantize_dynamic(fp32: Path, dest: Path, o: dict[str, Any], work: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    src = fp32
    if o["preprocess"]:
        src = work / "pre.onnx"
        quant_pre_process(str(fp32), str(src), skip_symbolic_shape=False)
    excluded = _check_exclude(onnx_graph(src), o["exclude"], o)
    # onnxruntime's CPU ConvInteger only has a uint8 x uint8 kernel, so weights are uint8 here.
    quantize_dynamic(str(src), str(dest), per_channel=o["per_channel"], reduce_range=o["reduce_range"],
                     weight_type=QuantType.QUInt8, nodes_to_exclude=excluded or None)
    return excluded


# ------------------------------------------------------------------------------------------------ export
def min_onnxruntime(model: Any) -> str:
    """Oldest onnxruntime release that implements the model's opset and IR version."""
    opset = max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=OPSET)
    need = [_ORT_FOR_OPSET.get(opset, "1.20"), _ORT_FOR_IR.get(model.ir_version, "1.20")]
    return max(need, key=lambda v: tuple(int(p) for p in v.split(".")))


def _descriptions(detector: bool, head: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if detector:
        inp = {"name": "input", "shape": ["N", 3, "H", "W"], "layout": "NCHW", "dtype": "float32",
               "channel_order": "BGR", "normalisation": "x - (104, 117, 123)",
               "preprocess": "edge3dfa.runtime.detect.prepare (upstream: shrink to fit 720x1080)"}
        out = {"name": "loc, conf", "shape": [["N", "P", 4], ["N", "P", 2]], "dtype": "float32",
               "layout": "SSD offsets per prior (edge3dfa.runtime.detect.prior_boxes(H, W)); softmax scores"}
        return inp, out
    inp = dict(CANONICAL_INPUT)
    if head == "landmarks":
        return inp, {"name": "landmarks", "shape": ["N", 3, 68], "dtype": "float32",
                     "layout": "x, y, z of the 68 landmarks in 120x120 crop pixels (upstream similar_transform "
                               "with roi [0,0,120,120]: x-1, 120-y, z-1 then z - min z); to image pixels: "
                               "x*(roi_w/120)+roi_x0, y*(roi_h/120)+roi_y0"}
    return inp, dict(CANONICAL_OUTPUT)


def _checked(precision: str, options: dict[str, Any], source: Any, calibration: Any) -> tuple[dict[str, Any], bool]:
    """Parsed options and whether ``source`` is the detector; combinations that cannot work are user errors."""
    if precision not in PRECISIONS:
        raise Edge3dfaError(f"onnx precision {precision!r} not offered; choose from {', '.join(PRECISIONS)}")
    o = parse_options(options)
    detector = bool(getattr(source, "is_detector", False))
    if detector:
        o["float_output"] = False  # two detection heads, each many small tensors: nothing like a params layer
    if detector and o["head"] != "params":
        raise Edge3dfaError("head=landmarks is for the 3DDFA regressors, not FaceBoxes")
    if detector and precision == "int8":
        raise Edge3dfaError("FaceBoxes int8 needs photo calibration, which is not offered; use fp32 or dyn-int8")
    if precision == "int8" and calibration is None:
        raise Edge3dfaError("onnx int8 needs a calibration set")
    if precision != "fp32" and o["head"] == "landmarks" and o["exporter"] != "torchscript":
        # the head is kept float by its node names (/head/...), which only the TorchScript exporter writes
        raise Edge3dfaError("a quantized head=landmarks model needs the default exporter (torchscript)")
    return o, detector


def _meta(source: Any, precision: str, o: dict[str, Any], detector: bool) -> dict[str, str]:
    return {"model": getattr(source, "name", "?"), "arch": getattr(source, "arch", "?"), "precision": precision,
            "head": "faceboxes" if detector else o["head"], "source_sha256": getattr(source, "sha256", "")}


def _float_graph(model: Any, detector: bool, o: dict[str, Any], work: Path) -> Path:
    """torch -> checked, shape-inferred, constant-folded fp32 ONNX in ``work``."""
    try:
        import onnx
    except ImportError as e:
        raise Edge3dfaError(f"the onnx converter needs onnx and onnxruntime ({e}); pip install 'edge3dfa[onnx]'") from e
    raw, fp32 = work / "raw.onnx", work / "fp32.onnx"
    raw.write_bytes(_torch_to_onnx(model, detector, o["head"], o["exporter"], o["opset"]))
    onnx.checker.check_model(str(raw))
    onnx.save_model(onnx.shape_inference.infer_shapes(onnx.load(str(raw)), strict_mode=True), str(raw))
    _ort_basic_optimise(raw, fp32)
    return fp32


def export(model: Any, dest: Path, precision: str, *, source: Any, calibration: Any = None,
           **options: Any) -> dict[str, Any]:
    """Write ``dest`` (one self-contained .onnx) and return the manifest fields this format fills.

    Options: exporter (torchscript|dynamo), opset (17), head (params|landmarks), and for int8
    calib_method (minmax|entropy|percentile), activations (u8|s8), weights (s8|u8), reduce_range, per_channel,
    activation_symmetric, percentile, preprocess (quant_pre_process), exclude (node names, comma separated).
    """
    o, detector = _checked(precision, options, source, calibration)
    dest = Path(dest)
    with temp_folder(dest.parent, "onnx", dest=dest) as work:
        if precision == "int8":
            return Int8Builder(model, source=source, calibration=calibration, work=work, **options).export(dest)
        final = _float_graph(model, detector, o, work)
        excluded: list[str] = []
        if precision == "dyn-int8":
            final, fp32 = work / "dyn.onnx", final
            excluded = _quantize_dynamic(fp32, final, o, work)
        proto = _finalise(final, dest, _meta(source, precision, o, detector))
    return _fields(precision, o, detector, excluded, proto)


def _fields(precision: str, o: dict[str, Any], detector: bool, excluded: list[str], proto: Any) -> dict[str, Any]:
    used = {"exporter": o["exporter"], "opset": o["opset"], "head": o["head"],
            "graph_optimisation": "onnxruntime offline basic (constant folding); BN folded at export"}
    notes = ["single self-contained file (no external .onnx.data)", "dynamic batch (dim 'N')"]
    if detector:
        notes.append("dynamic H, W: run on any blob from edge3dfa.runtime.detect.prepare; priors depend on H, W")
    if precision == "int8":
        used.update({"quant_format": "QDQ", "calib_method": o["calib_method"], "per_channel": o["per_channel"],
                     "activation_type": ACTIVATIONS[o["activations"]], "weight_type": ACTIVATIONS[o["weights"]],
                     "reduce_range": o["reduce_range"], "activation_symmetric": o["activation_symmetric"],
                     "quant_pre_process": o["preprocess"], "float_output": o["float_output"],
                     "float_input": o["float_input"], "bias_correction": o["bias_correction"],
                     "excluded_nodes": excluded})
        if o["calib_method"] == "percentile":
            used.update(percentile=o["percentile"], num_bins=o["num_bins"])
        elif o["calib_method"] == "entropy":
            used.update(num_bins=o["num_bins"], num_quantized_bins=o["num_quantized_bins"])
        notes.append("static int8 QDQ: onnxruntime runs it on int8 kernels; parity '<set> fake-quant' is the same "
                     "graph with optimisations off (Q/DQ as float ops), so the difference is kernel error")
        if o["weights"] == "s8" and not o["reduce_range"] and not o["float_input"]:
            notes.append("x86 CPUs without VNNI (AVX2 only) saturate u8 x s8 products in onnxruntime's fast kernels "
                         "(measured here: mb05 1.04 px vs 0.26 px fake-quant): for such CPUs reconvert with "
                         "--option weights=u8 --option activations=u8 (exact, but slower) or reduce_range=true, or "
                         "let --nme-budget choose by measurement")
    elif precision == "dyn-int8":
        used.update({"quant_format": "dynamic (ConvInteger/MatMulInteger)", "per_channel": o["per_channel"],
                     "weight_type": "QUInt8", "reduce_range": o["reduce_range"], "float_output": o["float_output"],
                     "excluded_nodes": excluded})
        notes.append("dynamic int8 quantizes activations at run time: on these CNNs it runs 2.5-11x SLOWER than fp32 "
                     "on onnxruntime's CPU provider (measured: mb05, x86); it only saves file size. Use int8 for speed")
    if o["head"] == "landmarks":
        notes.append("fused landmark head: outputs 68 landmarks, not params; Target.predict does not apply, use run()")
    inp, out = _descriptions(detector, o["head"])
    return {"options": used, "input": inp, "output": out, "notes": notes,
            "tools": tool_versions("torch", "onnx", "onnxruntime"),
            "min_runtime": {"onnxruntime": min_onnxruntime(proto)}}


# ------------------------------------------------------------------------------------------------ parity
def _graph_facts(path: Path) -> tuple[str, bool]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    return m.graph.output[0].name, quantized


def _landmark_compare(ref_params: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    roi = np.tile(np.array([[0, 0, runtime.INPUT_SIZE, runtime.INPUT_SIZE]], np.float32), (len(ref_params), 1))
    ref = runtime.to_image(runtime.reconstruct(runtime.denormalise(ref_params)), roi)
    px = np.linalg.norm(ref[:, :2].astype(np.float64) - cand[:, :2], axis=1)
    return {"landmark_max_px": float(px.max()), "landmark_mean_px": float(px.mean()),
            "z_max_abs": float(np.abs(ref[:, 2] - cand[:, 2]).max()), "n": int(len(ref_params))}


def _faceboxes_parity(path: Path, reference: Any, threads: int | None) -> dict[str, Any]:
    from edge3dfa import assets
    from edge3dfa.runtime.detect import prepare
    from edge3dfa.targets.onnxruntime import OnnxTarget
    from edge3dfa.targets.torch import TorchTarget

    ref = TorchTarget(reference.path, threads=threads, arch="faceboxes", model=reference.model)
    cand = OnnxTarget(path, threads=threads)
    out = {}
    for name in ("trump_hillary", "emma"):
        blob, _ = prepare(runtime.read_image(assets.fetch(name)))
        r, c = ref.run(blob), cand.run(blob)
        out[f"photo {name}"] = {"loc_max_abs": float(np.abs(r[0] - c[0]).max()),
                                "conf_max_abs": float(np.abs(r[1] - c[1]).max()),
                                "blob": list(blob.shape[2:]), "priors": int(r[0].shape[1])}
    return out


def extra_parity(path: str | os.PathLike, reference: Any, sets: dict[str, np.ndarray], *,
                 threads: int | None = None) -> dict[str, Any]:
    """What generic parity cannot show: int8 as fake-quant, the fused landmark head, FaceBoxes raw outputs."""
    from edge3dfa.measure.parity import compare
    from edge3dfa.targets.onnxruntime import OnnxTarget

    path = Path(path)
    output, quantized = _graph_facts(path)
    if output in ("loc", "conf"):
        return _faceboxes_parity(path, reference, threads)
    variants = [("", "all")] + ([(" fake-quant", "disable")] if quantized else [])
    if output == "params":
        variants = variants[1:]  # the runtime figure is the generic parity already
    out: dict[str, Any] = {}
    for name, x in sets.items():
        ref = np.concatenate([reference.predict(x[i:i + 64]) for i in range(0, len(x), 64)])
        for suffix, level in variants:
            target = OnnxTarget(path, threads=threads, optimization=level)
            cand = np.concatenate([target.run(x[i:i + 64])[0] for i in range(0, len(x), 64)])
            key = f"{name}{suffix}" if output == "params" else f"{name} landmarks{suffix}"
            out[key] = compare(ref, cand) if output == "params" else _landmark_compare(ref, cand)
    return out


# ------------------------------------------------------------------------------------------ the format
@dataclass(frozen=True)
class OnnxOptions(Options):
    """ONNX export and int8 options; defaults chosen by measurement (``DEFAULTS``, README "Int8")."""

    label = "onnx option"
    exporter: Literal["torchscript", "dynamo"] = option("torchscript", "torch.onnx exporter: torchscript (module-path "
                                                                       "node names that exclude= can name) or dynamo")
    opset: int = option(OPSET, "ONNX opset (17..20 with torchscript, 17..21 with dynamo)")
    head: Literal["params", "landmarks"] = option("params", "output: 62 params, or 68 landmarks in crop pixels "
                                                            "(fused landmark head)")
    exclude: tuple[str, ...] = option((), "int8: node names kept float, comma separated")
    calib_method: Literal["percentile", "minmax", "entropy"] = option("percentile", "int8 activation ranges")
    activations: Literal["s8", "u8"] = option("s8", "int8 activation type")
    weights: Literal["s8", "u8"] = option("s8", "int8 weight type")
    reduce_range: bool = option(False, "int8: 7-bit weights (avoids u8 x s8 saturation on x86 without VNNI)")
    per_channel: bool = option(True, "int8: per-channel weight scales")
    activation_symmetric: bool = option(False, "int8: symmetric activation ranges")
    preprocess: bool = option(True, "int8: onnxruntime's quant_pre_process first")
    float_output: bool = option(True, "int8: keep the params layer float")
    float_input: bool = option(True, "int8: keep the first conv float")
    bias_correction: bool = option(False, "int8: correct each layer's weight-rounding error (Nagel et al. 2019)")
    percentile: float = option(99.999, "int8, calib_method=percentile: the percentile kept")
    num_bins: int = option(2048, "int8: histogram bins of percentile/entropy calibration")
    num_quantized_bins: int = option(128, "int8, calib_method=entropy: quantized bins")
    calib_batch: int = option(32, "int8: calibration batch size (largest divisor of the count up to this)")

    def check(self) -> None:
        parse_options(self.to_dict())  # ranges and combinations, with the messages the format has always given


class OnnxFormat(Format):
    name = "onnx"
    suffix = SUFFIX
    extra = "onnx"
    precisions = PRECISIONS
    default_precisions = PRECISIONS
    Options = OnnxOptions
    int8_candidates = INT8_CANDIDATES

    def check(self, precision: str, detector: bool, options: Options) -> None:
        super().check(precision, detector, options)
        _checked(precision, options.to_dict(), _Task(detector), calibration=True)

    def write(self, source: Any, dest: Path, precision: str, options: Options, calibration: Any) -> dict[str, Any]:
        return export(source.load(), dest, precision, source=source, calibration=calibration, **options.to_dict())

    def int8_builder(self, source: Any, options: Options, calibration: Any, work: Path) -> Int8Builder:
        return Int8Builder(source.load(), source=source, calibration=calibration, work=work, **options.to_dict())

    def extra_parity(self, path: Path, reference: Any, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        return extra_parity(path, reference, sets, threads=threads)


@dataclass(frozen=True)
class _Task:
    is_detector: bool
