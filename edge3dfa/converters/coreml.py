"""PyTorch -> CoreML ML program (``.mlpackage``), with weight and activation compression, converted on Linux.

The graph is captured with ``torch.jit.trace`` (default) or ``torch.export`` (``route="export"``): both convert
every zoo model and FaceBoxes to identical programs (same ops, bit-identical outputs); trace was faster (17 vs
20 s for the five models, median of 3) and lets the detector take images down to 32 px (export: 129). The
graph is converted by coremltools to an ML program. Precisions:

* ``fp32`` / ``fp16``: compute precision of the program (fp16 = what the GPU / Neural Engine run).
* ``w8``: int8 symmetric weights (``linear_quantize_weights``) per output channel (iOS16), or per block of 32
  input channels with ``target="iOS18"`` (mb05: 0.29 -> 0.07 px mean landmark error); fp16 compute.
* ``pal6`` / ``pal4``: 6 / 4-bit palettized weights (``palettize_weights``), uniform LUT per tensor with
  iOS18's per-channel scales (default target iOS18: without them BN-folded weights lose mb05 ~10 px at 6 bits);
  coremltools' k-means needs scikit-learn (not in the coreml extra); a 1-D k-means LUT tried with per-channel
  scales measured worse than uniform (0.77 vs 0.48 px at 6 bits), so uniform it is.
* ``w8a8``: int8 activations (quantize/dequantize pairs, iOS17) + int8 weights, built by ``Int8Builder``.
  coremltools calibrates activations with CoreML ``predict`` (macOS only); here the ranges come from running
  the program in the numpy MIL evaluator over the calibration crops, so it converts on Linux too. Defaults
  (``W8A8_DEFAULTS``), each measured on mb05 (README "Int8 within an NME budget"): the params layer stays float
  (``float_output``, as ONNX and TFLite keep it): its 8-bit output tensor was nearly all of w8a8's error;
  the first conv is int8 (``float_input=false``; ONNX keeps it float for onnxruntime's x86 kernels, but here
  keeping it float helped mb05 and hurt MobileNet-V3 by about as much, so it is left to the search); ranges
  are min / max clipped to the 99.999th percentile of |x| (plain min / max and the 99.99th percentile did
  worse on the held-out AFLW crops, on which every default was chosen). ``--nme-budget`` searches more float
  layers
  (``workflows.budget``; CoreML's calibrated 8-bit precision is w8a8, so the budget applies to it).

The deployment target is the lowest that has the chosen compression scheme: iOS16 / macOS13 (fp32, fp16, w8),
iOS17 / macOS14 (w8a8), iOS18 / macOS15 (pal6, pal4). Inputs are float32 tensors, or with ``input="image"``
a BGR image whose (x - 127.5) / 128 normalisation is folded into the model, so an app feeds a CVPixelBuffer as
is. Outputs are float32.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np

from edge3dfa import __version__
from edge3dfa.converters.base import Format
from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
from edge3dfa.options import Options, option
from edge3dfa.targets.mil_eval import (
    MILEvaluator,
    blas_threads,
    import_coremltools,
    program_of,
    quiet_coremltools,
)

PRECISIONS = ("fp32", "fp16", "w8", "pal6", "pal4", "w8a8")
#: what `edge3dfa export` converts unless asked: pal4 costs +3 NME on mb05 (measured), so it is opt-in
DEFAULT_PRECISIONS = ("fp32", "fp16", "w8", "pal6", "w8a8")
SUFFIX = ".mlpackage"
INPUTS = ("tensor", "image")
ROUTES = ("trace", "export")
DEFAULT_ROUTE = "trace"
TARGETS = ("iOS16", "iOS17", "iOS18")
_MIN_TARGET = {"w8a8": "iOS17"}
#: pal defaults to iOS18 for its per-channel scales: a per-tensor LUT (iOS16) put mb05 10 px off, iOS18 0.5 px
_DEFAULT_TARGET = {"w8a8": "iOS17", "pal6": "iOS18", "pal4": "iOS18"}
W8_BLOCK = 32
_OS_VERSIONS = {"iOS16": {"iOS": "16", "macOS": "13", "tvOS": "16", "watchOS": "9"},
                "iOS17": {"iOS": "17", "macOS": "14", "tvOS": "17", "watchOS": "10"},
                "iOS18": {"iOS": "18", "macOS": "15", "tvOS": "18", "watchOS": "11"}}
#: the detector takes any image up to upstream's 720x1080 limit (edge3dfa.runtime.detect); torch.export's
#: shape guards need every stride-128 map to be > 1 cell, so that route starts at 129 pixels
DETECTOR_RANGE = {"trace": (32, 720, 1080), "export": (129, 720, 1080)}
CALIB_MAX = 256
#: w8a8 options and their defaults (module docstring; README "Int8 within an NME budget" has the measurements)
W8A8_DEFAULTS: dict[str, Any] = {"float_output": True, "float_input": False, "calib_method": "percentile",
                                 "percentile": 99.999, "float_layers": ()}
CALIB_METHODS = ("minmax", "percentile")
RANGE_BINS = 2048
#: what --nme-budget tries (workflows.budget): one configuration; float layers do the rest
INT8_CANDIDATES: dict[str, dict[str, Any]] = {"w8a8": {}}
PARAMS_LAYOUT = ("62 normalised 3DMM params: 0-11 pose (3x4 camera matrix, row-major), 12-51 shape (40 BFM "
                 "identity coefficients), 52-61 expression (10); params = out * param_std + param_mean "
                 "(3DDFA_V2 param_mean_std_62d_120x120.pkl)")
LICENSE = ("3DDFA_V2 code and weights: MIT (cleardusk/3DDFA_V2); models trained on Basel Face Model fits: "
           "academic use only (BFM 2009 licence). A custom checkpoint carries its own licence.")


def export(model: Any, dest: Path, precision: str, *, source: Any, calibration: Any = None,
           input: str = "tensor", route: str = DEFAULT_ROUTE, compute: str | None = None,
           target: str | None = None, **options: Any) -> dict[str, Any]:
    """Convert ``model`` to ``dest`` (.mlpackage); returns the manifest fields this format fills.

    Options: ``input`` tensor|image, ``route`` trace|export, ``compute`` fp16|fp32 (compute precision of the
    compressed variants, default fp16), ``target`` iOS16|iOS17|iOS18 (raise the deployment target; iOS18 gives
    the blockwise / grouped compression ops); for w8a8 also those of ``W8A8_DEFAULTS`` (see ``Int8Builder``).
    """
    o = check_options(precision, source.is_detector, {"input": input, "route": route, "compute": compute,
                                                      "target": target, **options})
    if precision == "w8a8":
        if calibration is None:
            raise Edge3dfaError("coreml w8a8 needs a calibration set (real face crops)")
        return Int8Builder(model, source=source, calibration=calibration, input=input, route=route,
                           compute=compute, target=target, **options).export(dest)
    input, route, compute, target = o["input"], o["route"], o["compute"], o["target"]
    detector = source.is_detector
    ct = import_coremltools()
    notes: list[str] = []
    mlmodel = _convert(ct, model, detector, input, route, compute, target)
    compression: dict[str, Any] = {}
    ios18 = TARGETS.index(target) >= TARGETS.index("iOS18")
    if precision == "w8":
        mlmodel = _compress(ct, mlmodel, "w8", ios18)
        compression["weights"] = _w8_info(ios18)
    elif precision in ("pal6", "pal4"):
        mlmodel = _compress(ct, mlmodel, precision, ios18)
        compression["weights"] = {"palettization_bits": int(precision[3:]), "mode": "uniform",
                                  "granularity": "per_tensor", "per_channel_scale": ios18}
        notes.append("palettization LUT is uniform between each tensor's min and max (k-means needs scikit-learn)"
                     + ("" if ios18 else "; without iOS18's per-channel scales it costs mb05 ~10 px"))
    notes += _weight_notes(precision, compute, ios18)
    if detector:
        notes.append("flexible input size: CoreML runs flexible shapes on CPU/GPU, not the Neural Engine")
    return _save(mlmodel, Path(dest), source, precision, notes, input=input, route=route, compute=compute,
                 target=target, compression=compression)


def _w8_info(ios18: bool) -> dict[str, Any]:
    return {"dtype": "int8", "mode": "linear_symmetric",
            "granularity": f"per_block {W8_BLOCK} input channels" if ios18 else "per_channel"}


def _weight_notes(precision: str, compute: str, ios18: bool) -> list[str]:
    notes = []
    if ios18 and precision in ("w8", "w8a8"):
        notes.append("depthwise kernels stay fp16 under iOS18 per-block int8 (one input channel per block)")
    if precision not in ("fp32", "fp16"):
        notes.append("weights with fewer than 2048 elements (biases, small depthwise kernels) are kept in "
                     f"{compute} (coremltools' weight_threshold)")
    return notes


def _save(mlmodel: Any, dest: Path, source: Any, precision: str, notes: list[str], *, input: str, route: str,
          compute: str, target: str, compression: dict[str, Any]) -> dict[str, Any]:
    """Describe and write ``mlmodel`` to ``dest``; returns the manifest fields."""
    _describe(mlmodel, source, precision, input)
    with quiet_coremltools():
        mlmodel.save(str(dest))
    return {
        "options": {"input": input, "route": route, "compute_precision": compute, "deployment_target": target,
                    "compression": compression},
        "input": _input_info(source.is_detector, input, route),
        "output": _output_info(source.is_detector),
        "notes": notes,
        "min_runtime": dict(_OS_VERSIONS[target]),
        "tools": tool_versions("coremltools", "torch"),
    }


def check_options(precision: str, detector: bool, options: dict[str, Any]) -> dict[str, Any]:
    """``export``'s options (input, route, compute, target) checked, with defaults filled in; unknown keys and bad
    values are user errors, raised before anything is converted (``convert`` asks every format first)."""
    known = {"input", "route", "compute", "target", *W8A8_DEFAULTS}  # w8a8's apply to w8a8 only, as ONNX's int8 ones
    unknown = sorted(set(options) - known)
    if unknown:
        raise Edge3dfaError(f"unknown coreml option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    _w8a8_options(options)  # their values are checked whatever the precision, so a typo never waits for w8a8
    input, route = options.get("input", "tensor"), options.get("route", DEFAULT_ROUTE)
    compute, target = options.get("compute"), options.get("target")
    if precision not in PRECISIONS:
        raise Edge3dfaError(f"coreml precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if input not in INPUTS:
        raise Edge3dfaError(f"coreml option input must be one of {', '.join(INPUTS)}, got {input!r}")
    if route not in ROUTES:
        raise Edge3dfaError(f"coreml option route must be one of {', '.join(ROUTES)}, got {route!r}")
    if compute not in (None, "fp16", "fp32") or (compute is not None and precision in ("fp32", "fp16")):
        raise Edge3dfaError(f"coreml option compute takes fp16|fp32 for compressed precisions, got {compute!r} "
                            f"with {precision}")
    floor = _MIN_TARGET.get(precision, "iOS16")
    target = target or _DEFAULT_TARGET.get(precision, floor)
    if target not in TARGETS or TARGETS.index(target) < TARGETS.index(floor):
        raise Edge3dfaError(f"coreml option target: {precision} needs deployment target {floor} or later "
                            f"({', '.join(TARGETS[TARGETS.index(floor):])}), got {target!r}")
    if detector and input == "image":
        raise Edge3dfaError("input=image is for the 120x120 regressors; the detector takes a mean-subtracted tensor")
    if detector and precision == "w8a8":
        raise Edge3dfaError("w8a8 calibrates on face crops; convert the detector at fp32, fp16, w8, pal6 or pal4")
    if precision == "w8a8" and compute == "fp32":  # its pairs after conv/add get fp16 scales whatever the program
        raise Edge3dfaError("coreml w8a8 computes in fp16 (coremltools' activation quantization writes fp16 "
                            "scales); compute=fp32 is for w8, pal6 and pal4")
    return {"input": input, "route": route, "target": target,
            "compute": compute or ("fp32" if precision == "fp32" else "fp16")}


def _convert(ct: Any, model: Any, detector: bool, input: str, route: str, compute: str, target: str) -> Any:
    """Capture the graph (trace or export) and convert it to an ML program."""
    import torch

    model = model.eval()
    lo, max_h, max_w = DETECTOR_RANGE[route]
    example = torch.zeros(1, 3, 320, 320) if detector else torch.zeros(1, 3, 120, 120)
    try:
        with quiet_coremltools(), torch.no_grad():
            if route == "trace":
                graph = torch.jit.trace(model, example, check_trace=False)  # parity checks it, stronger
            else:
                from torch.export import Dim

                dyn = ({2: Dim("h", min=lo, max=max_h), 3: Dim("w", min=lo, max=max_w)},) if detector else None
                graph = torch.export.export(model, (example,), dynamic_shapes=dyn).run_decompositions({})
    except Exception as e:  # noqa: BLE001 - tracer errors name the failing op
        raise Edge3dfaError(f"torch.{'jit.trace' if route == 'trace' else 'export'} failed: {_one_line(e)}") from None
    if detector:
        shape = (1, 3, ct.RangeDim(lo, max_h, default=max_h), ct.RangeDim(lo, max_w, default=max_w))
        inputs = [ct.TensorType(name="input", shape=shape if route == "trace" else None, dtype=np.float32)]
        outputs = [ct.TensorType(name="loc", dtype=np.float32), ct.TensorType(name="conf", dtype=np.float32)]
    else:
        if input == "image":
            inputs = [ct.ImageType(name="image", shape=(1, 3, 120, 120), scale=1 / 128, bias=[-127.5 / 128] * 3,
                                   color_layout=ct.colorlayout.BGR)]
        else:
            inputs = [ct.TensorType(name="input", shape=(1, 3, 120, 120), dtype=np.float32)]
        outputs = [ct.TensorType(name="params", dtype=np.float32)]
    try:
        with quiet_coremltools():
            return ct.convert(graph, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=getattr(ct.target, target),
                              compute_precision=ct.precision.FLOAT32 if compute == "fp32" else ct.precision.FLOAT16,
                              skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - unsupported torch ops surface here
        raise Edge3dfaError(f"coremltools could not convert the model: {_one_line(e)}") from None


def _compress(ct: Any, mlmodel: Any, kind: str, ios18: bool, keep: Any = ()) -> Any:
    """int8 weights (per output channel; iOS18: per block of input channels) or a uniform LUT (iOS18: with
    per-channel scales, which BN-folded weights need). The weights of ops named in ``keep`` stay as they are
    (coremltools takes a const's config from the op that reads it)."""
    import coremltools.optimize as cto

    if kind == "w8":
        block = {"granularity": "per_block", "block_size": W8_BLOCK} if ios18 else {"granularity": "per_channel"}
        op = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", **block)
        fn = cto.coreml.linear_quantize_weights
    else:
        op = cto.coreml.OpPalettizerConfig(mode="uniform", nbits=int(kind[3:]), granularity="per_tensor",
                                           enable_per_channel_scale=ios18)
        fn = cto.coreml.palettize_weights
    config = cto.coreml.OptimizationConfig(global_config=op, op_name_configs=dict.fromkeys(keep))
    with quiet_coremltools():
        return fn(mlmodel, config)


# ------------------------------------------------------------------------------------------------ w8a8
def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise Edge3dfaError(f"coreml option {key} must be true or false, got {value!r}")


def _w8a8_options(options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validated w8a8 options with ``W8A8_DEFAULTS`` filled in, and the keys that are not w8a8's."""
    o = {**W8A8_DEFAULTS, **{k: v for k, v in options.items() if k in W8A8_DEFAULTS}}
    for key in ("float_output", "float_input"):
        o[key] = _bool(key, o[key])
    o["calib_method"] = str(o["calib_method"]).lower()
    if o["calib_method"] not in CALIB_METHODS:
        raise Edge3dfaError(f"coreml option calib_method must be one of {', '.join(CALIB_METHODS)}, "
                            f"got {o['calib_method']!r}")
    try:
        o["percentile"] = float(o["percentile"])
    except (TypeError, ValueError):
        raise Edge3dfaError(f"coreml option percentile must be a number, got {o['percentile']!r}") from None
    if not 50.0 < o["percentile"] <= 100.0:
        raise Edge3dfaError(f"coreml option percentile={o['percentile']:g}: must be in (50, 100]")
    layers = o["float_layers"]
    o["float_layers"] = [n.strip() for n in layers.split(",") if n.strip()] if isinstance(layers, str) \
        else [str(n) for n in layers or ()]
    return o, sorted(set(options) - set(W8A8_DEFAULTS))


def _module_order(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(module path, weight shape) of every Conv2d / Linear in the order the forward pass calls them."""
    import torch

    calls: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: calls.append((name, tuple(mod.weight.shape))))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 120, 120))
    finally:
        for h in hooks:
            h.remove()
    return [(name.replace(".", "/"), shape) for name, shape in calls]


def _weighted(op: Any) -> bool:
    w = op.inputs.get("weight") if op.op_type in ("conv", "linear") else None
    return w is not None and w.op is not None and (w.op.op_type == "const" or w.op.op_type.startswith("constexpr_"))


def layer_units(program: Any, modules: list[tuple[str, tuple[int, ...]]] | None = None) -> dict[str, list[str]]:
    """Candidate layers for mixed precision, in program order: each conv / linear with a constant weight, with the
    ops after it up to the next one (activation, residual add, pool, reshape, the output cast); values are op
    names. A layer is named by the torch module that made its weighted op (``dw5_1/conv_dw``, ``fc``: module
    paths, as TFLite names them) when ``modules`` (``_module_order``) lines up with the program's weighted ops
    one to one, weight shapes included; otherwise by the weighted op's name."""
    ops = [op for op in program.functions["main"].operations
           if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    weighted = [op for op in ops if _weighted(op)]
    shapes = [tuple(op.inputs["weight"].shape) for op in weighted]
    lined_up = modules is not None and [s for _, s in modules] == shapes and len({n for n, _ in modules}) == len(shapes)
    names = iter([n for n, _ in modules] if lined_up else [op.name for op in weighted])
    units: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for op in ops:
        if _weighted(op):
            current = next(names)
            units[current] = pending
            pending = []
        (units[current] if current else pending).append(op.name)
    return units


def _run(evaluator: MILEvaluator, samples: np.ndarray, observe: Any) -> None:
    name = next(iter(evaluator.input_vars))
    with blas_threads(1):
        for s in samples:
            evaluator({name: s[None]}, observer=observe)


def activation_ranges(mlmodel: Any, samples: np.ndarray, method: str = "percentile",
                      percentile: float = 99.999) -> dict[str, dict[str, float]]:
    """(rmin, rmax) of every float tensor of ``mlmodel``'s program over ``samples``, run by the numpy MIL evaluator
    (coremltools' own calibration runs CoreML predict, macOS only): ``minmax`` the extremes over all crops;
    ``percentile`` clips them to the ``percentile``-th percentile of |x| over every value of every crop, read from a
    histogram of |x| (``RANGE_BINS`` bins up to the tensor's max |x|, the upper edge of the bin holding it)
    filled in a second pass. (Activations are quantized symmetrically: only max |x| sets the scale.)"""
    evaluator = MILEvaluator(program_of(mlmodel), name="calibration")
    outputs = set(evaluator.output_names)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def extremes(name: str, value: np.ndarray) -> None:
        if name not in outputs and np.issubdtype(value.dtype, np.floating):
            a, b = float(value.min()), float(value.max())
            lo[name], hi[name] = min(lo.get(name, a), a), max(hi.get(name, b), b)

    _run(evaluator, samples, extremes)
    ranges = {k: {"rmin": lo[k], "rmax": hi[k]} for k in lo}
    if method == "minmax":
        return ranges
    top = {k: max(-lo[k], hi[k]) for k in lo if max(-lo[k], hi[k]) > 0}
    hist = {k: np.zeros(RANGE_BINS, np.int64) for k in top}

    def histogram(name: str, value: np.ndarray) -> None:
        if name in hist:
            bins = (np.abs(value.astype(np.float32)) * np.float32(RANGE_BINS / top[name])).astype(np.int64)
            hist[name] += np.bincount(np.minimum(bins, RANGE_BINS - 1).ravel(), minlength=RANGE_BINS)

    _run(evaluator, samples, histogram)
    for k, h in hist.items():
        edge = (np.searchsorted(np.cumsum(h) / h.sum(), percentile / 100.0) + 1) * top[k] / RANGE_BINS
        ranges[k] = {"rmin": max(lo[k], -edge), "rmax": min(hi[k], edge)}
    return ranges


@contextlib.contextmanager
def _evaluator_calibration(stats_fn: Any) -> Iterator[None]:
    """Route coremltools' activation statistics (CoreML predict, macOS only) to ``stats_fn``."""
    from coremltools.optimize.coreml import _post_training_quantization as ptq

    with mock.patch.object(ptq, "_get_activation_calibration_stats", stats_fn):
        yield


def _quantize_activations(ct: Any, mlmodel: Any, ranges: dict[str, dict[str, float]], keep: Any = ()) -> Any:
    """W8A8 step 1: quantize/dequantize pairs placed by coremltools with the measured ``ranges``; ops named in
    ``keep`` get none (coremltools puts the pairs on the inputs and outputs of conv, linear, pools and add)."""
    import coremltools.optimize as cto
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    def stats_fn(fpmodel: Any, _sample_data: Any, _group_size: int = -1) -> dict:
        stats = {k: dict(v) for k, v in ranges.items()}
        _adjust_concat_surrounding_activation_stats(ModelDebugger(fpmodel)._get_concat_op_info(), stats)
        return stats

    name = mlmodel.get_spec().description.input[0].name
    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8"), op_name_configs=dict.fromkeys(keep))
    try:  # the ranges are given, so coremltools' calibration sample is only checked for its input name
        with _evaluator_calibration(stats_fn), quiet_coremltools():
            return cto.coreml.linear_quantize_activations(mlmodel, config, [{name: np.zeros((1, 3, 120, 120))}])
    except Edge3dfaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise Edge3dfaError(f"coremltools activation quantization failed: {_one_line(e)}") from None


def _unquantized(var: Any) -> Any:
    """The tensor before a quantize/dequantize pair, if ``var`` is the output of one; else ``var``."""
    op = var.op
    if op is None or op.op_type != "dequantize":
        return var
    q = op.inputs["input"].op
    return q.inputs["input"] if q is not None and q.op_type == "quantize" else var


def _float_readers(ct: Any, mlmodel: Any, keep: Any) -> Any:
    """W8A8 step 2: the ops named in ``keep`` read float tensors. coremltools gives an int8 layer a
    quantize/dequantize pair on its output whoever reads it; a float reader is given the tensor before the pair
    (the pair stays for int8 readers and goes when none is left), so a layer kept float has no pair in front."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    names = set(keep)

    def flat(v: Any) -> list:
        return list(v) if isinstance(v, (list, tuple)) else [v]

    class FloatReaders(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for f in prog.functions.values():
                self.rewire(f)

        @block_context_manager
        def rewire(self, block: Any) -> None:
            for op in list(block.operations):
                if op.name not in names or all(_unquantized(u) is u for v in op.inputs.values() for u in flat(v)):
                    continue
                args = {k: [_unquantized(u) for u in v] if isinstance(v, (list, tuple)) else _unquantized(v)
                        for k, v in op.inputs.items()}
                with mb.set_before_op(op):
                    new = getattr(mb, op.op_type)(**args, name=op.name)
                new.name = op.outputs[0].name
                if block.try_replace_uses_of_var_after_op(anchor_op=new.op, old_var=op.outputs[0], new_var=new):
                    block.remove_ops([op])

    passes = [FloatReaders(), PASS_REGISTRY["common::dead_code_elimination"]]
    with quiet_coremltools():
        return _apply_graph_pass(mlmodel, passes, spec_version=ct._SPECIFICATION_VERSION_IOS_17,  # noqa: SLF001
                                 pymil_load_func=milproto.load, skip_model_load=True)


class Int8Builder(BaseInt8Builder):
    """The float ML program, converted and calibrated once, quantized to w8a8 as often as asked with different
    ``layers`` kept float (the --nme-budget search builds dozens of variants; the evaluator passes over the
    calibration crops are the slow part, so they run once).

    A layer is a weighted op (conv, linear) with the ops after it up to the next one (``layer_units``). Layers
    kept float (``always_float``: ``float_layers``, the params layer with ``float_output``, the first conv with
    ``float_input``; plus ``keep_float`` per export) read float tensors (no quantize/dequantize pair in front of
    them), compute in the program's float precision with float weights, and write float tensors; an int8 layer
    that reads one quantizes it at its own input.
    """

    def __init__(self, model: Any, *, source: Any, calibration: Any, work: Any = None, input: str = "tensor",
                 route: str = DEFAULT_ROUTE, compute: str | None = None, target: str | None = None,
                 **options: Any) -> None:
        checked = check_options("w8a8", source.is_detector, {"input": input, "route": route, "compute": compute,
                                                             "target": target, **options})
        if calibration is None:
            raise Edge3dfaError("coreml w8a8 needs a calibration set (real face crops)")
        self.o, _ = _w8a8_options(options)
        self.target, self.compute = checked["target"], checked["compute"]
        self.source, self.input, self.route = source, input, route
        self.ct = import_coremltools()
        t0 = time.perf_counter()
        self.mlmodel = _convert(self.ct, model, False, input, route, self.compute, self.target)
        self.units = layer_units(program_of(self.mlmodel), _module_order(model))
        self.always_float = self._always_float()
        self.layers = {k: v for k, v in self.units.items() if k not in self.always_float}
        crops = crops_of(calibration)[:CALIB_MAX]
        self.samples = len(crops)
        pixels = crops * np.float32(128) + np.float32(127.5) if input == "image" else crops
        self.ranges = activation_ranges(self.mlmodel, pixels, self.o["calib_method"], self.o["percentile"])
        self.seconds = time.perf_counter() - t0

    def _always_float(self) -> list[str]:
        names = list(self.units)
        unknown = [k for k in self.o["float_layers"] if k not in self.units]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=3) or names[:3]
            raise Edge3dfaError(f"coreml float_layers: no layer {unknown[0]!r}; e.g. {', '.join(close)}")
        keep = {*self.o["float_layers"], *([names[-1]] if self.o["float_output"] else []),
                *([names[0]] if self.o["float_input"] else [])}
        return [k for k in names if k in keep]  # program order

    def _record(self, float_layers: list[str], ios18: bool) -> tuple[dict[str, Any], list[str]]:
        """The manifest's ``compression`` and notes for a w8a8 artifact with ``float_layers`` float."""
        o = self.o
        how = ("min/max" if o["calib_method"] == "minmax"
               else f"min/max clipped to the {o['percentile']:g}th percentile of |x|")
        compression = {"activations": {"dtype": "int8", "mode": "linear_symmetric", "granularity": "per_tensor",
                                       "calibration": f"{how} over {self.samples} crops, numpy MIL evaluator",
                                       "calib_method": o["calib_method"], "float_output": o["float_output"],
                                       "float_input": o["float_input"], "float_layers": float_layers},
                       "weights": _w8_info(ios18)}
        if o["calib_method"] == "percentile":
            compression["activations"]["percentile"] = o["percentile"]
        notes = [f"activation ranges: {how} over every calibration crop, from the numpy MIL evaluator "
                 "(coremltools' own calibration runs CoreML predict, macOS only)"]
        if float_layers:
            why = [w for w, on in (("float_input: the first conv reads the full-range image", o["float_input"]),
                                   ("float_output: an 8-bit params tensor was most of w8a8's error",
                                    o["float_output"])) if on]
            notes.append(f"w8a8: {len(float_layers)} layer(s) kept float (no quantize/dequantize pair in front, "
                         f"{self.compute} weights): {', '.join(float_layers)}"
                         + (f" ({'; '.join(why)}; README 'Int8 within an NME budget')" if why else ""))
        notes += _weight_notes("w8a8", self.compute, ios18)
        return compression, notes

    def export(self, dest: str | os.PathLike, keep_float: Any = ()) -> dict[str, Any]:
        """Write ``dest`` with ``keep_float`` layers float too; returns its manifest fields (as ``export`` does)."""
        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the program; e.g. {', '.join(list(self.layers)[:3])}")
        t0 = time.perf_counter()
        float_layers = [k for k in self.units if k in {*self.always_float, *keep_float}]  # program order
        ops = [n for k in float_layers for n in self.units[k]]
        mlmodel = _quantize_activations(self.ct, self.mlmodel, self.ranges, ops)
        if ops:
            mlmodel = _float_readers(self.ct, mlmodel, ops)
        ios18 = TARGETS.index(self.target) >= TARGETS.index("iOS18")
        mlmodel = _compress(self.ct, mlmodel, "w8", ios18, ops)
        compression, notes = self._record(float_layers, ios18)
        notes.append(f"converted in {self.seconds + time.perf_counter() - t0:.1f} s")
        fields = _save(mlmodel, Path(dest), self.source, "w8a8", notes, input=self.input, route=self.route,
                       compute=self.compute, target=self.target, compression=compression)
        if keep_float:
            fields["options"]["float_layers"] = list(keep_float)
        return fields


def _describe(mlmodel: Any, source: Any, precision: str, input: str) -> None:
    """Model metadata an iOS developer sees in Xcode."""
    mlmodel.author = f"edge3dfa {__version__} (from {Path(source.path).name}, sha256 {source.sha256[:12]})"
    mlmodel.license = LICENSE if not source.is_detector else "FaceBoxes weights from 3DDFA_V2: MIT (cleardusk/3DDFA_V2)"
    mlmodel.version = __version__
    meta = {"edge3dfa.model": source.name, "edge3dfa.arch": source.arch, "edge3dfa.precision": precision,
            "edge3dfa.source_sha256": source.sha256}
    if source.is_detector:
        mlmodel.short_description = ("FaceBoxes face detector (3DDFA_V2's): BGR image minus mean (104,117,123), "
                                     "NCHW -> per-prior box offsets and face probabilities")
        mlmodel.input_description["input"] = "float32 [1,3,H,W] BGR image minus (104,117,123), H<=720, W<=1080"
        mlmodel.output_description["loc"] = "[1,P,4] SSD box offsets per prior (variances 0.1, 0.2)"
        mlmodel.output_description["conf"] = "[1,P,2] softmax (background, face) per prior"
        meta["edge3dfa.priors"] = "edge3dfa.runtime.detect.prior_boxes(H, W): steps 32/64/128, min sizes " \
                                  "(32,64,128)/(256)/(512), order (source, row, col, anchor)"
    else:
        wf = f" x{source.widen_factor:g}" if source.widen_factor else ""
        mlmodel.short_description = (f"3DDFA_V2 {source.arch}{wf} dense face alignment regressor: 120x120 BGR "
                                     "face crop -> 62 normalised 3DMM params (pose, shape, expression)")
        if input == "image":
            mlmodel.input_description["image"] = ("120x120 BGR face crop (3DDFA_V2 roi crop), pixels 0..255; "
                                                  "(x - 127.5) / 128 is applied inside the model")
        else:
            mlmodel.input_description["input"] = "float32 [1,3,120,120] BGR face crop, (x - 127.5) / 128, NCHW"
        mlmodel.output_description["params"] = "float32 [1,62] " + PARAMS_LAYOUT
        meta["edge3dfa.params_layout"] = json.dumps({"pose": [0, 12], "shape": [12, 52], "expression": [52, 62],
                                                     "pose_matrix": "3x4 row-major", "normalised": True})
        meta["edge3dfa.input_normalisation"] = "(x - 127.5) / 128, BGR" + (" (inside the model)" if input == "image"
                                                                             else "")
    mlmodel.user_defined_metadata.update(meta)


def _input_info(detector: bool, input: str, route: str) -> dict[str, Any]:
    if detector:
        lo, max_h, max_w = DETECTOR_RANGE[route]
        return {"name": "input", "kind": "tensor", "shape": [1, 3, "H", "W"], "layout": "NCHW", "dtype": "float32",
                "channel_order": "BGR", "normalisation": "x - (104, 117, 123)",
                "flexible": {"H": [lo, max_h], "W": [lo, max_w]}}
    if input == "image":
        return {"name": "image", "kind": "image", "shape": [1, 3, 120, 120], "color_layout": "BGR",
                "pixels": "uint8 0..255 (CVPixelBuffer)", "normalisation": "inside the model: x / 128 - 127.5 / 128",
                "canonical": dict(CANONICAL_INPUT)}
    return {**CANONICAL_INPUT, "kind": "tensor", "shape": [1, 3, 120, 120]}


def _output_info(detector: bool) -> dict[str, Any]:
    if detector:
        return {"name": "loc,conf", "names": ["loc", "conf"], "shape": [[1, "P", 4], [1, "P", 2]],
                "dtype": "float32", "layout": "loc: SSD offsets per prior; conf: softmax (background, face)"}
    return {**CANONICAL_OUTPUT, "shape": [1, 62]}


def extra_parity(path: Path, reference: Any, sets: dict[str, np.ndarray], threads: int | None = None) -> dict:
    """Which runtime measured parity, and for the detector its raw outputs vs PyTorch on two photos."""
    from edge3dfa.targets.coreml import coreml_runtime_available

    out: dict[str, Any] = {"evaluated_by": "coreml" if coreml_runtime_available() else "mil-numpy"}
    if sets:
        return out
    from edge3dfa import assets, runtime
    from edge3dfa.runtime.detect import prepare
    from edge3dfa.target import open_target
    from edge3dfa.targets.torch import TorchTarget

    target = open_target(path, threads=threads)
    reference = TorchTarget(reference.path, threads=threads, arch="faceboxes", model=reference.model)
    for name in ("emma", "trump_hillary"):
        blob, _ = prepare(runtime.read_image(assets.fetch(name)))
        ref, cand = reference.run(blob), target.run(blob)
        out[f"detector_{name}"] = {"shape": list(blob.shape), "loc_max_abs": float(np.abs(ref[0] - cand[0]).max()),
                                   "conf_max_abs": float(np.abs(ref[1] - cand[1]).max())}
    return out


def _one_line(e: object, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def latency_unmeasured() -> str | None:
    """Why --nme-budget cannot time CoreML artifacts on this machine; None where CoreML itself runs them (macOS)."""
    from edge3dfa.targets.coreml import coreml_runtime_available

    if coreml_runtime_available():
        return None
    return ("CoreML predict needs macOS; here the numpy MIL evaluator runs the artifacts, and its speed says "
            "nothing about a device's")


# ------------------------------------------------------------------------------------------ the format
@dataclass(frozen=True)
class CoreMLOptions(Options):
    """CoreML options; ``None`` means the default that follows from the precision."""

    label = "coreml option"
    input: Literal["tensor", "image"] = option("tensor", "a float tensor, or a BGR image (normalisation inside)")
    route: Literal["trace", "export"] = option(DEFAULT_ROUTE, "graph capture: torch.jit.trace or torch.export")
    compute: Literal["fp16", "fp32"] | None = option(None, "compute precision of compressed precisions "
                                                           "(default fp16)")
    target: Literal["iOS16", "iOS17", "iOS18"] | None = option(None, "minimum deployment target (default: the "
                                                                      "lowest with the precision's ops)")
    float_output: bool = option(W8A8_DEFAULTS["float_output"], "w8a8: keep the params layer float")
    float_input: bool = option(W8A8_DEFAULTS["float_input"], "w8a8: keep the first conv float")
    calib_method: Literal["minmax", "percentile"] = option(W8A8_DEFAULTS["calib_method"], "w8a8 activation ranges")
    percentile: float = option(W8A8_DEFAULTS["percentile"], "w8a8, calib_method=percentile: percentile of |x| kept")
    float_layers: tuple[str, ...] = option((), "w8a8: layers kept float, comma separated")


class CoreMLFormat(Format):
    name = "coreml"
    suffix = SUFFIX
    extra = "coreml"
    precisions = PRECISIONS
    default_precisions = DEFAULT_PRECISIONS
    calibrated = frozenset({"w8a8"})
    Options = CoreMLOptions
    int8_candidates = INT8_CANDIDATES

    def check(self, precision: str, detector: bool, options: Options) -> None:
        super().check(precision, detector, options)
        check_options(precision, detector, options.to_dict())

    def write(self, source: Any, dest: Path, precision: str, options: Options, calibration: Any) -> dict[str, Any]:
        return export(source.load(), dest, precision, source=source, calibration=calibration, **options.to_dict())

    def int8_builder(self, source: Any, options: Options, calibration: Any, work: Path) -> Int8Builder:
        return Int8Builder(source.load(), source=source, calibration=calibration, work=work, **options.to_dict())

    def extra_parity(self, path: Path, reference: Any, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        return extra_parity(path, reference, sets, threads=threads)

    def latency_unmeasured(self) -> str | None:
        return latency_unmeasured()
