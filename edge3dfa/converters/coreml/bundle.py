"""CoreML phone bundles: an ImageType in (a CVPixelBuffer goes straight in), landmarks / pose / params out, or for
FaceBoxes boxes / scores after NMS in the program; the contract inside the package.

Why an ImageType: CoreML turns the app's pixel buffer into the program's planes itself (in the ``color_layout``
the bundle was converted with), so the Swift side passes a CVPixelBuffer and reads named outputs; the
``(x - 127.5) / 128`` normalisation is in the program (the ImageType has scale 1, no bias). An image input is one
image: the batch is 1 (the contract's input shape is ``[1, 120, 120]``, layout "image").

* fp32: the whole program computes in float32.
* int8 (regressor): w8a8 on the network only (coremltools.optimize; ``Int8Builder``'s calibration with the numpy
  MIL evaluator). The network computes in fp16 with int8 activation pairs and int8 weights; the pre-processing
  (channel flip, normalisation) and the post-processing (de-normalisation, the 68-point reconstruction, the pose's
  atan2 pieces) stay float32, outside the quantizer's op-name config and the fp16 pass's op selector.
* detector (fp32): FaceBoxes at a fixed input size with prior decoding (``models.bundle.detector_bundle``) and
  then MIL's ``non_maximum_suppression`` with the runtime's thresholds (``edge3dfa.runtime.detect``): candidates
  above 0.05, IoU 0.3, at most 750 boxes, reported above 0.5. Boxes enter NMS widened by one pixel (0.5 per
  side), which is exactly the runtime's ``+ 1`` pixel areas and overlaps. What differs from the runtime's numpy
  NMS, only at exact ties: MIL keeps a candidate scoring exactly 0.05 and suppresses at IoU > 0.3 (the runtime:
  > 0.05 and >= 0.3); the runtime takes the best 5000 candidates first (of 6400 priors at 480x640: this only
  drops candidates scoring below every box it could change); the runtime applies the +1 in photo pixels, the
  bundle in input pixels (a photo shrunk to fit moves an IoU by a fraction of a pixel's worth).

Neural Engine (issue part 5): on Linux nothing can be measured (coremltools' ``MLComputePlan`` needs macOS and a
compiled model); what the program itself shows is recorded in the manifest notes (``ane_notes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa import __version__, bundle
from edge3dfa.converters.coreml.export import OS_VERSIONS, resolve
from edge3dfa.converters.coreml.int8 import Int8Builder, layer_units, module_order
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line
from edge3dfa.manifest import tool_versions
from edge3dfa.runtime.detect import CONFIDENCE_THRESHOLD, FIXED_SIZE, KEEP_TOP_K, NMS_THRESHOLD, SCORE_THRESHOLD
from edge3dfa.targets.mil_eval import import_coremltools, program_of, quiet_coremltools

if TYPE_CHECKING:
    from edge3dfa.converters.coreml import CoreMLOptions
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

#: the detector bundle's NMS in words, from the runtime's detection rules (edge3dfa.runtime.detect)
NMS_NOTE = (f"NMS in the model (MIL non_maximum_suppression): candidates scoring >= {CONFIDENCE_THRESHOLD}, greedy at "
            f"IoU > {NMS_THRESHOLD} with the runtime's +1 pixel box sizes, at most {KEEP_TOP_K} boxes, then scores > "
            f"{SCORE_THRESHOLD}; boxes in input pixels, best score first")


def check(precision: str, detector: bool) -> None:
    """The bundles this converter builds: regressor fp32 and int8, detector fp32."""
    allowed = ("fp32",) if detector else ("fp32", "int8")
    if precision not in allowed:
        what = "detector" if detector else "regressor"
        raise Edge3dfaError(f"coreml {what} bundles are built at {' and '.join(allowed)}, not {precision}")


def contract(source: Checkpoint) -> dict[str, Any]:
    channels = source.bundle.channels
    if source.is_detector:
        return bundle.detector_contract(*FIXED_SIZE, channels=channels, layout="image", nms=NMS_NOTE)
    return bundle.regressor_contract(channels, layout="image")


def image_input(ct: Any, source: Checkpoint) -> Any:
    """The ImageType: pixels 0..255 as they are (scale 1, no bias; the normalisation is in the program)."""
    h, w = FIXED_SIZE if source.is_detector else (120, 120)
    layout = ct.colorlayout.RGB if source.bundle.channels == "rgb" else ct.colorlayout.BGR
    return ct.ImageType(name=bundle.INPUT_NAME, shape=(1, 3, h, w), scale=1.0, bias=[0.0, 0.0, 0.0],
                        color_layout=layout)


def convert_bundle(source: Checkpoint, options: CoreMLOptions) -> Any:
    """The float32 ML program of ``source.bundle_module("NCHW")`` with an ImageType input (detector: before NMS)."""
    import torch

    ct = import_coremltools()
    size = FIXED_SIZE if source.is_detector else (120, 120)
    names = bundle.DETECTOR_OUTPUTS if source.is_detector else bundle.OUTPUTS
    module = source.bundle_module("NCHW", input_size=FIXED_SIZE if source.is_detector else None)
    try:
        with quiet_coremltools(), torch.no_grad():
            graph = torch.jit.trace(module.eval(), torch.zeros(1, 3, *size), check_trace=False)
            return ct.convert(graph, inputs=[image_input(ct, source)],
                              outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
                              convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                              minimum_deployment_target=getattr(ct.target, options.deployment_target),
                              skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - tracer and converter errors name the failing op
        raise Edge3dfaError(f"coremltools could not convert the bundle: {one_line(e)}") from None


def add_nms(mlmodel: Any, source: Checkpoint, options: CoreMLOptions) -> Any:
    """The detector program with MIL NMS after the decoded boxes [P,4] and scores [P]: outputs ``boxes`` [K,4],
    ``scores`` [K] (the kept boxes scoring above ``SCORE_THRESHOLD``, best first)."""
    from coremltools.converters.mil.mil import Builder as mb

    ct = import_coremltools()
    prog = program_of(mlmodel, "detector bundle")
    main = prog.functions["main"]
    boxes, scores = main.outputs
    for var, name in ((boxes, "decoded_boxes"), (scores, "decoded_scores")):
        var.name = var.op.name = name
    with main:
        top_left, bottom_right = (mb.slice_by_index(x=boxes, begin=[0, b], end=[0, b + 2], begin_mask=[True, False],
                                                    end_mask=[True, False]) for b in (0, 2))
        centre = mb.mul(x=mb.add(x=top_left, y=bottom_right), y=np.float32(0.5))
        size = mb.add(x=mb.sub(x=bottom_right, y=top_left), y=np.float32(1.0))  # the runtime's +1 pixel
        _, kept_scores, kept, count = mb.non_maximum_suppression(
            boxes=mb.expand_dims(x=mb.concat(values=[centre, size], axis=1), axes=[0]),
            scores=mb.reshape(x=scores, shape=[1, -1, 1]), iou_threshold=np.float32(NMS_THRESHOLD),
            score_threshold=np.float32(CONFIDENCE_THRESHOLD), max_boxes=KEEP_TOP_K)
        rows = np.arange(KEEP_TOP_K, dtype=np.int32)  # kept rows are by descending score: reported ones lead
        reported = mb.logical_and(x=mb.greater(x=mb.reshape(x=kept_scores, shape=[KEEP_TOP_K]),
                                               y=np.float32(SCORE_THRESHOLD)),
                                  y=mb.less(x=rows, y=count))
        n = mb.reduce_sum(x=mb.cast(x=reported, dtype="int32"), axes=[0], keep_dims=True)
        index = mb.slice_by_size(x=mb.reshape(x=kept, shape=[KEEP_TOP_K]), begin=[0], size=n)
        out_boxes = mb.gather(x=boxes, indices=index, axis=0, name="boxes")
        out_scores = mb.gather(x=scores, indices=index, axis=0, name="scores")
        main.set_outputs([out_boxes, out_scores])
    try:
        with quiet_coremltools():
            return ct.convert(prog, inputs=[image_input(ct, source)], convert_to="mlprogram",
                              compute_precision=ct.precision.FLOAT32,
                              minimum_deployment_target=getattr(ct.target, options.deployment_target),
                              skip_model_load=True)
    except Exception as e:  # noqa: BLE001
        raise Edge3dfaError(f"coremltools could not add NMS to the detector bundle: {one_line(e)}") from None


def split_program(mlmodel: Any, n_weighted: int) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """A regressor bundle program cut into (the network's layers as (weighted op, its ops), network op names,
    frame op names), in program order. The network runs from its first to its ``n_weighted``-th weighted op (its
    convs and fc, ``module_order(net)``, which the program calls in order); everything before it (channel flip,
    normalisation) and after it (``PostProcess``, whose folded bases are one more weighted op) is the frame."""
    prog = program_of(mlmodel)
    names = [op.name for op in prog.functions["main"].operations
             if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    units = list(layer_units(prog).items())
    if len(units) < n_weighted:
        raise Edge3dfaError(f"the bundle program has {len(units)} weighted ops, the network {n_weighted}")
    first, last = names.index(units[0][0]), names.index(units[n_weighted - 1][0])
    inside = set(names[first:last + 1])
    layers = [(key, [o for o in ops if o in inside]) for key, ops in units[:n_weighted]]
    return layers, [x for x in names if x in inside], [x for x in names if x not in inside]


class BundleInt8Builder(Int8Builder):
    """``Int8Builder`` on a regressor bundle: only the network's layers are candidates (int8 activations and
    weights, fp16 compute); the frame (pre/post-processing) is always float32 (no quantize/dequantize pairs, no
    compressed weights, left out of the fp16 pass). Calibration runs on the image planes the ImageType gives."""

    def _program(self) -> tuple[Any, dict[str, list[str]]]:
        modules = module_order(self.source.load())
        fp32 = convert_bundle(self.source, self.options)
        _, network, _ = split_program(fp32, len(modules))
        mlmodel = _fp16_network(fp32, set(network))
        layers, _, self.frame = split_program(mlmodel, len(modules))
        return mlmodel, {name: ops for (name, _), (_, ops) in zip(modules, layers)}

    def _program_input(self, crops: np.ndarray) -> np.ndarray:
        return bundle.to_image_uint8(crops, self.source.bundle.channels, "NCHW").astype(np.float32)

    def frame_ops(self) -> list[str]:
        return list(self.frame)

    def save(self, mlmodel: Any, dest: Path, notes: list[str], compression: dict[str, Any]) -> dict[str, Any]:
        return save_bundle(mlmodel, dest, self.source, "int8", self.options, notes, compression, self.frame)


def _fp16_network(mlmodel: Any, network: set[str]) -> Any:
    """The program with the network's ops computing in fp16 (casts at its edges), the frame in float32."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    passes = [FP16ComputePrecision(op_selector=lambda op: op.name in network),
              PASS_REGISTRY["common::dead_code_elimination"]]
    ios17 = import_coremltools()._SPECIFICATION_VERSION_IOS_17  # noqa: SLF001
    with quiet_coremltools():
        return _apply_graph_pass(mlmodel, passes, spec_version=ios17, pymil_load_func=milproto.load,
                                 skip_model_load=True)


def write_bundle(source: Checkpoint, dest: Path, precision: str, options: CoreMLOptions,
                 calibration: CalibrationSet | None) -> dict[str, Any]:
    """Write a bundle at ``dest``; returns the manifest fields."""
    check(precision, source.is_detector)
    if precision == "int8":
        if calibration is None:
            raise Edge3dfaError("coreml int8 needs a calibration set (real face crops)")
        return BundleInt8Builder(source, options, calibration, dest.parent).export(dest)
    options = resolve("fp32", options)
    mlmodel = convert_bundle(source, options)
    if source.is_detector:
        mlmodel = add_nms(mlmodel, source, options)
    return save_bundle(mlmodel, dest, source, precision, options, [], {})


def ane_notes(mlmodel: Any, precision: str, detector: bool, frame: list[str] | None = None) -> list[str]:
    """What the program shows about Neural Engine eligibility (nothing is measured on Linux)."""
    from coremltools.converters.mil.mil import types

    ops = [op for op in program_of(mlmodel).functions["main"].operations
           if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    # the Neural Engine computes in fp16 (and int8), so ops whose outputs are bool or int32 fall back to the CPU
    # (coremltools docs, "Typed Execution": a float32-typed program runs on the GPU and CPU)
    non_float = sorted({op.op_type for op in ops
                        if any(types.is_bool(v.dtype) or v.dtype == types.int32 for v in op.outputs)})
    notes = ["Neural Engine: not measured (coremltools' MLComputePlan needs macOS); from the program:"]
    if precision == "fp32":
        params = "the fp16 detector artifact" if detector else "the fp16 / int8 params artifact"
        notes.append("fp32 compute precision: CoreML runs float32-typed programs on the GPU and CPU, not the Neural "
                     f"Engine (coremltools docs, 'Typed Execution'); {params} is the accelerator path")
    else:
        fp32 = sorted({op.op_type for op in ops if op.name in set(frame or ())})
        notes.append("int8: the network computes in fp16 with int8 activations and weights (Neural Engine "
                     f"eligible by type); the pre/post-processing stays float32, so CoreML runs it on the CPU or "
                     f"GPU (with a hand-over after the network): {', '.join(fp32)}; for all of it on the Neural "
                     "Engine the int8 params artifact is the accelerator path (the app then does the "
                     "post-processing)")
    if non_float:
        why = "NMS and the choice of reported boxes" if detector else "the pose's atan2 and gimbal-lock branches"
        notes.append(f"ops with bool / int32 outputs, which the Neural Engine (fp16 / int8) does not compute: "
                     f"{', '.join(non_float)} ({why})")
    return notes


def describe_bundle(mlmodel: Any, source: Checkpoint, precision: str, spec: dict[str, Any]) -> None:
    """The contract where Xcode shows it: descriptions, licence, version, and the JSON under ``edge3dfa.bundle``."""
    inp = spec["input"]
    mlmodel.author = f"edge3dfa {__version__} (from {Path(source.path).name}, sha256 {source.sha256[:12]})"
    mlmodel.license = spec["licence"]
    mlmodel.version = __version__
    if source.is_detector:
        mlmodel.short_description = ("edge3dfa phone bundle: FaceBoxes face detector with prior decoding and NMS "
                                     f"in the model; {inp['shape'][1]}x{inp['shape'][2]} image in, face boxes out")
    else:
        mlmodel.short_description = ("edge3dfa phone bundle: 120x120 face crop in; 68 landmarks (crop pixels), "
                                     "head pose (degrees) and 3DMM params out. " + " / ".join(bundle.ROI_MAPPING))
    mlmodel.input_description[bundle.INPUT_NAME] = (
        f"image, pixels 0..255 as they are (CoreML reads the pixel buffer into {inp['channel_order']} planes "
        f"itself); " + inp["meaning"])
    for name, out in spec["outputs"].items():
        shape = "[" + ",".join(map(str, out["shape"])) + "]"
        mlmodel.output_description[name] = f"{out['dtype']} {shape} {out['meaning']}"
    mlmodel.user_defined_metadata.update({
        bundle.METADATA_KEY: json.dumps(spec, sort_keys=True), "edge3dfa.model": source.name,
        "edge3dfa.arch": source.arch, "edge3dfa.precision": precision, "edge3dfa.source_sha256": source.sha256})


def save_bundle(mlmodel: Any, dest: Path, source: Checkpoint, precision: str, options: CoreMLOptions,
                notes: list[str], compression: dict[str, Any], frame: list[str] | None = None) -> dict[str, Any]:
    """Describe and write a bundle; returns the manifest fields."""
    spec = contract(source)
    describe_bundle(mlmodel, source, precision, spec)
    with quiet_coremltools():
        mlmodel.save(str(dest))
    names = bundle.DETECTOR_OUTPUTS if source.is_detector else bundle.OUTPUTS
    kind = "detector" if source.is_detector else "regressor"
    notes = [f"phone {kind} bundle: image in (CoreML ImageType, one image per prediction), "
             f"{', '.join(names)} out (edge3dfa.bundle); the contract is in the package's user-defined metadata "
             "under edge3dfa.bundle", *([NMS_NOTE] if source.is_detector else []), *notes,
             *ane_notes(mlmodel, precision, source.is_detector, frame)]
    return {"options": {"route": "trace", "compute_precision": "fp32" if precision == "fp32" else "mixed",
                        "deployment_target": options.deployment_target, "compression": compression,
                        "bundle": source.bundle.to_dict()},
            "input": {**spec["input"], "kind": "image"},
            "output": {"name": ", ".join(names), **spec["outputs"]},
            "bundle": spec, "notes": notes, "min_runtime": dict(OS_VERSIONS[options.deployment_target]),
            "tools": tool_versions("coremltools", "torch")}
