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
* ``w8a8``: int8 activations (quantize/dequantize pairs, iOS17) + int8 weights. coremltools calibrates
  activations with CoreML ``predict`` (macOS only); here the ranges come from running the program in the
  numpy MIL evaluator over the calibration crops, so it converts on Linux too. Ranges are the min / max over
  all crops: averaging per-crop extremes or taking percentiles halved the mean error on AFLW2000-3D but
  clipped held-out crops up to 17-48 px off (min / max: 4.7 px worst).

The deployment target is the lowest that has the chosen compression scheme: iOS16 / macOS13 (fp32, fp16, w8),
iOS17 / macOS14 (w8a8), iOS18 / macOS15 (pal6, pal4). Inputs are float32 tensors, or with ``input="image"``
a BGR image whose (x - 127.5) / 128 normalisation is folded into the model, so an app feeds a CVPixelBuffer as
is. Outputs are float32.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from edge3dfa import __version__
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
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
    the blockwise / grouped compression ops).
    """
    detector = source.is_detector
    o = check_options(precision, detector, {"input": input, "route": route, "compute": compute, "target": target,
                                            **options})
    input, route, compute, target = o["input"], o["route"], o["compute"], o["target"]
    if precision == "w8a8" and calibration is None:
        raise Edge3dfaError("coreml w8a8 needs a calibration set (real face crops)")
    ct = import_coremltools()
    notes: list[str] = []

    mlmodel = _convert(ct, model, detector, input, route, compute, target)
    compression: dict[str, Any] = {}
    if precision == "w8a8":
        crops = calibration.data[:CALIB_MAX]
        samples = crops * np.float32(128) + np.float32(127.5) if input == "image" else crops
        mlmodel = _quantize_activations(ct, mlmodel, samples)
        compression["activations"] = {"dtype": "int8", "mode": "linear_symmetric", "granularity": "per_tensor",
                                      "calibration": f"min/max over {len(samples)} crops, numpy MIL evaluator"}
        notes.append("activation ranges: min/max over every calibration crop, from the numpy MIL evaluator "
                     "(coremltools' own calibration runs CoreML predict, macOS only)")
    ios18 = TARGETS.index(target) >= TARGETS.index("iOS18")
    if precision in ("w8", "w8a8"):
        mlmodel = _compress(ct, mlmodel, "w8", ios18)
        compression["weights"] = {"dtype": "int8", "mode": "linear_symmetric",
                                  "granularity": f"per_block {W8_BLOCK} input channels" if ios18 else "per_channel"}
    elif precision in ("pal6", "pal4"):
        mlmodel = _compress(ct, mlmodel, precision, ios18)
        compression["weights"] = {"palettization_bits": int(precision[3:]), "mode": "uniform",
                                  "granularity": "per_tensor", "per_channel_scale": ios18}
        notes.append("palettization LUT is uniform between each tensor's min and max (k-means needs scikit-learn)"
                     + ("" if ios18 else "; without iOS18's per-channel scales it costs mb05 ~10 px"))
    if ios18 and precision in ("w8", "w8a8"):
        notes.append("depthwise kernels stay fp16 under iOS18 per-block int8 (one input channel per block)")
    if compression.get("weights"):
        notes.append("weights with fewer than 2048 elements (biases, small depthwise kernels) are kept in "
                     f"{compute} (coremltools' weight_threshold)")
    if detector:
        notes.append("flexible input size: CoreML runs flexible shapes on CPU/GPU, not the Neural Engine")
    _describe(mlmodel, source, precision, input)
    with quiet_coremltools():
        mlmodel.save(str(dest))
    return {
        "options": {"input": input, "route": route, "compute_precision": compute, "deployment_target": target,
                    "compression": compression},
        "input": _input_info(detector, input, route),
        "output": _output_info(detector),
        "notes": notes,
        "min_runtime": dict(_OS_VERSIONS[target]),
        "tools": tool_versions("coremltools", "torch"),
    }


def check_options(precision: str, detector: bool, options: dict[str, Any]) -> dict[str, Any]:
    """``export``'s options (input, route, compute, target) checked, with defaults filled in; unknown keys and bad
    values are user errors, raised before anything is converted (``convert`` asks every format first)."""
    unknown = sorted(set(options) - {"input", "route", "compute", "target"})
    if unknown:
        raise Edge3dfaError(f"unknown coreml option(s) {', '.join(unknown)}; known: compute, input, route, target")
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


def _compress(ct: Any, mlmodel: Any, kind: str, ios18: bool) -> Any:
    """int8 weights (per output channel; iOS18: per block of input channels) or a uniform LUT (iOS18: with
    per-channel scales, which BN-folded weights need)."""
    import coremltools.optimize as cto

    if kind == "w8":
        block = {"granularity": "per_block", "block_size": W8_BLOCK} if ios18 else {"granularity": "per_channel"}
        op = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", **block)
        fn = cto.coreml.linear_quantize_weights
    else:
        op = cto.coreml.OpPalettizerConfig(mode="uniform", nbits=int(kind[3:]), granularity="per_tensor",
                                           enable_per_channel_scale=ios18)
        fn = cto.coreml.palettize_weights
    with quiet_coremltools():
        return fn(mlmodel, cto.coreml.OptimizationConfig(global_config=op))


@contextlib.contextmanager
def _evaluator_calibration(stats_fn: Any) -> Iterator[None]:
    """Route coremltools' activation statistics (CoreML predict, macOS only) to ``stats_fn``."""
    from coremltools.optimize.coreml import _post_training_quantization as ptq

    with mock.patch.object(ptq, "_get_activation_calibration_stats", stats_fn):
        yield


def _quantize_activations(ct: Any, mlmodel: Any, samples: np.ndarray) -> Any:
    """W8A8 step 1: quantize/dequantize pairs placed by coremltools, ranges measured by the MIL evaluator."""
    import coremltools.optimize as cto
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    def stats_fn(fpmodel: Any, sample_data: list[dict[str, np.ndarray]], _group_size: int = -1) -> dict:
        evaluator = MILEvaluator(program_of(fpmodel), name="calibration")
        outputs = set(evaluator.output_names)
        stats: dict[str, dict[str, float]] = {}

        def observe(name: str, value: np.ndarray) -> None:
            if name in outputs or not np.issubdtype(value.dtype, np.floating):
                return
            lo, hi = float(value.min()), float(value.max())
            s = stats.setdefault(name, {"rmin": lo, "rmax": hi})
            s["rmin"], s["rmax"] = min(s["rmin"], lo), max(s["rmax"], hi)

        with blas_threads(1):
            for sample in sample_data:
                evaluator(sample, observer=observe)
        _adjust_concat_surrounding_activation_stats(ModelDebugger(fpmodel)._get_concat_op_info(), stats)
        return stats

    name = mlmodel.get_spec().description.input[0].name
    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8"))
    try:
        with _evaluator_calibration(stats_fn), quiet_coremltools():
            return cto.coreml.linear_quantize_activations(mlmodel, config, [{name: s[None]} for s in samples])
    except Edge3dfaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise Edge3dfaError(f"coremltools activation quantization failed: {_one_line(e)}") from None


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
