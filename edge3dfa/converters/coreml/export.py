"""fp32 / fp16 ML programs: capture the PyTorch graph, convert it with coremltools, describe and save the package.

The graph is captured with ``torch.jit.trace`` (default) or ``torch.export`` (``route="export"``): both convert
every zoo model and FaceBoxes to identical programs (same ops, bit-identical outputs); trace was faster (17 vs
20 s for the five models, median of 3) and lets the detector take images down to 32 px (export: 129).
The compressed precisions (``compression``, ``int8``) start from the program built here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa import __version__
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
from edge3dfa.targets.mil_eval import import_coremltools, quiet_coremltools

if TYPE_CHECKING:
    from edge3dfa.converters.coreml import CoreMLOptions
    from edge3dfa.models import Checkpoint

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
#: the lowest deployment target with a precision's ops (int8 activations: iOS17)
MIN_TARGET = {"int8": "iOS17"}
#: pal defaults to iOS18 for its per-channel scales: a per-tensor LUT (iOS16) put mb05 10 px off, iOS18 0.5 px
DEFAULT_TARGET = {"int8": "iOS17", "pal6": "iOS18", "pal4": "iOS18"}
OS_VERSIONS = {"iOS16": {"iOS": "16", "macOS": "13", "tvOS": "16", "watchOS": "9"},
               "iOS17": {"iOS": "17", "macOS": "14", "tvOS": "17", "watchOS": "10"},
               "iOS18": {"iOS": "18", "macOS": "15", "tvOS": "18", "watchOS": "11"}}
#: the detector takes any image up to upstream's 720x1080 limit (edge3dfa.runtime.detect); torch.export's
#: shape guards need every stride-128 map to be > 1 cell, so that route starts at 129 pixels
DETECTOR_RANGE = {"trace": (32, 720, 1080), "export": (129, 720, 1080)}
PARAMS_LAYOUT = ("62 normalised 3DMM params: 0-11 pose (3x4 camera matrix, row-major), 12-51 shape (40 BFM "
                 "identity coefficients), 52-61 expression (10); params = out * param_std + param_mean "
                 "(3DDFA_V2 param_mean_std_62d_120x120.pkl)")
LICENSE = ("3DDFA_V2 code and weights: MIT (cleardusk/3DDFA_V2); models trained on Basel Face Model fits: "
           "academic use only (BFM 2009 licence). A custom checkpoint carries its own licence.")
DETECTOR_LICENSE = "FaceBoxes weights from 3DDFA_V2: MIT (cleardusk/3DDFA_V2)"


def resolve(precision: str, options: CoreMLOptions) -> CoreMLOptions:
    """``options`` with what follows from the precision filled in: the compute precision (fp32 for fp32, else
    fp16) and the deployment target (the lowest with the precision's ops, iOS18 for palettes)."""
    floor = MIN_TARGET.get(precision, "iOS16")
    return options.replace(compute=options.compute or ("fp32" if precision == "fp32" else "fp16"),
                           deployment_target=options.deployment_target or DEFAULT_TARGET.get(precision, floor))


def at_least(target: str, floor: str) -> bool:
    return DEPLOYMENT_TARGETS.index(target) >= DEPLOYMENT_TARGETS.index(floor)


def write_float(source: Checkpoint, dest: Path, precision: str, options: CoreMLOptions) -> dict[str, Any]:
    """fp32 or fp16 (the program's compute precision) at ``dest``; returns the manifest fields."""
    mlmodel = convert_program(source.load(), source.is_detector, options)
    return save(mlmodel, dest, source, precision, options, detector_notes(source.is_detector), {})


def detector_notes(detector: bool) -> list[str]:
    return ["flexible input size: CoreML runs flexible shapes on CPU/GPU, not the Neural Engine"] if detector else []


def _capture(model: Any, detector: bool, route: str) -> Any:
    """The traced (or exported) graph of ``model``."""
    import torch

    lo, max_h, max_w = DETECTOR_RANGE[route]
    example = torch.zeros(1, 3, 320, 320) if detector else torch.zeros(1, 3, 120, 120)
    try:
        with quiet_coremltools(), torch.no_grad():
            if route == "trace":
                return torch.jit.trace(model.eval(), example, check_trace=False)  # parity checks it, stronger
            from torch.export import Dim

            dyn = ({2: Dim("h", min=lo, max=max_h), 3: Dim("w", min=lo, max=max_w)},) if detector else None
            return torch.export.export(model.eval(), (example,), dynamic_shapes=dyn).run_decompositions({})
    except Exception as e:  # noqa: BLE001 - tracer errors name the failing op
        raise Edge3dfaError(f"torch.{'jit.trace' if route == 'trace' else 'export'} failed: {one_line(e)}") from None


def _io(ct: Any, detector: bool, options: CoreMLOptions) -> tuple[list[Any], list[Any]]:
    """coremltools input and output types: the detector's flexible tensor, or a 120x120 tensor or BGR image."""
    if detector:
        lo, max_h, max_w = DETECTOR_RANGE[options.route]
        shape = (1, 3, ct.RangeDim(lo, max_h, default=max_h), ct.RangeDim(lo, max_w, default=max_w))
        inputs = [ct.TensorType(name="input", shape=shape if options.route == "trace" else None, dtype=np.float32)]
        return inputs, [ct.TensorType(name="loc", dtype=np.float32), ct.TensorType(name="conf", dtype=np.float32)]
    if options.input == "image":
        inputs = [ct.ImageType(name="image", shape=(1, 3, 120, 120), scale=1 / 128, bias=[-127.5 / 128] * 3,
                               color_layout=ct.colorlayout.BGR)]
    else:
        inputs = [ct.TensorType(name="input", shape=(1, 3, 120, 120), dtype=np.float32)]
    return inputs, [ct.TensorType(name="params", dtype=np.float32)]


def convert_program(model: Any, detector: bool, options: CoreMLOptions) -> Any:
    """Capture ``model`` and convert it to an ML program (``options`` resolved: ``resolve``)."""
    ct = import_coremltools()
    graph = _capture(model, detector, options.route)
    inputs, outputs = _io(ct, detector, options)
    precision = ct.precision.FLOAT32 if options.compute == "fp32" else ct.precision.FLOAT16
    try:
        with quiet_coremltools():
            return ct.convert(graph, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=getattr(ct.target, options.deployment_target),
                              compute_precision=precision, skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - unsupported torch ops surface here
        raise Edge3dfaError(f"coremltools could not convert the model: {one_line(e)}") from None


def save(mlmodel: Any, dest: Path, source: Checkpoint, precision: str, options: CoreMLOptions, notes: list[str],
         compression: dict[str, Any]) -> dict[str, Any]:
    """Describe and write ``mlmodel`` to ``dest``; returns the manifest fields."""
    describe(mlmodel, source, precision, options.input)
    with quiet_coremltools():
        mlmodel.save(str(dest))
    return {
        "options": {"input": options.input, "route": options.route, "compute_precision": options.compute,
                    "deployment_target": options.deployment_target, "compression": compression},
        "input": input_info(source.is_detector, options.input, options.route),
        "output": output_info(source.is_detector),
        "notes": notes,
        "min_runtime": dict(OS_VERSIONS[options.deployment_target]),
        "tools": tool_versions("coremltools", "torch"),
    }


def describe(mlmodel: Any, source: Checkpoint, precision: str, input: str) -> None:  # noqa: A002 - option name
    """Model metadata an iOS developer sees in Xcode."""
    mlmodel.author = f"edge3dfa {__version__} (from {Path(source.path).name}, sha256 {source.sha256[:12]})"
    mlmodel.license = DETECTOR_LICENSE if source.is_detector else LICENSE
    mlmodel.version = __version__
    meta = {"edge3dfa.model": source.name, "edge3dfa.arch": source.arch, "edge3dfa.precision": precision,
            "edge3dfa.source_sha256": source.sha256}
    meta.update(_describe_detector(mlmodel) if source.is_detector else _describe_regressor(mlmodel, source, input))
    mlmodel.user_defined_metadata.update(meta)


def _describe_detector(mlmodel: Any) -> dict[str, str]:
    mlmodel.short_description = ("FaceBoxes face detector (3DDFA_V2's): BGR image minus mean (104,117,123), "
                                 "NCHW -> per-prior box offsets and face probabilities")
    mlmodel.input_description["input"] = "float32 [1,3,H,W] BGR image minus (104,117,123), H<=720, W<=1080"
    mlmodel.output_description["loc"] = "[1,P,4] SSD box offsets per prior (variances 0.1, 0.2)"
    mlmodel.output_description["conf"] = "[1,P,2] softmax (background, face) per prior"
    return {"edge3dfa.priors": "edge3dfa.runtime.detect.prior_boxes(H, W): steps 32/64/128, min sizes "
                               "(32,64,128)/(256)/(512), order (source, row, col, anchor)"}


def _describe_regressor(mlmodel: Any, source: Checkpoint, input: str) -> dict[str, str]:  # noqa: A002
    wf = f" x{source.widen_factor:g}" if source.widen_factor else ""
    mlmodel.short_description = (f"3DDFA_V2 {source.arch}{wf} dense face alignment regressor: 120x120 BGR "
                                 "face crop -> 62 normalised 3DMM params (pose, shape, expression)")
    if input == "image":
        mlmodel.input_description["image"] = ("120x120 BGR face crop (3DDFA_V2 roi crop), pixels 0..255; "
                                              "(x - 127.5) / 128 is applied inside the model")
    else:
        mlmodel.input_description["input"] = "float32 [1,3,120,120] BGR face crop, (x - 127.5) / 128, NCHW"
    mlmodel.output_description["params"] = "float32 [1,62] " + PARAMS_LAYOUT
    inside = " (inside the model)" if input == "image" else ""
    return {"edge3dfa.params_layout": json.dumps({"pose": [0, 12], "shape": [12, 52], "expression": [52, 62],
                                                  "pose_matrix": "3x4 row-major", "normalised": True}),
            "edge3dfa.input_normalisation": "(x - 127.5) / 128, BGR" + inside}


def input_info(detector: bool, input: str, route: str) -> dict[str, Any]:  # noqa: A002 - option name
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


def output_info(detector: bool) -> dict[str, Any]:
    if detector:
        return {"name": "loc,conf", "names": ["loc", "conf"], "shape": [[1, "P", 4], [1, "P", 2]],
                "dtype": "float32", "layout": "loc: SSD offsets per prior; conf: softmax (background, face)"}
    return {**CANONICAL_OUTPUT, "shape": [1, 62]}
