"""TFLite phone bundles: ``Checkpoint.bundle_module("NHWC")`` as a flatbuffer whose names are the contract.

* Names: the module is converted as one signature (named by the bundle kind: "regressor" or "detector") with a keyword
  input ``image`` and a dict output, so litert-torch names the signature's input and outputs as the contract says
  (``image``; ``landmarks``, ``pose``, ``params`` or ``boxes``, ``scores``), never ``serving_default_args_0`` /
  ``output_0``; the I/O tensors themselves are renamed the same way, so the plain ``Interpreter`` details agree.
* The contract (``edge3dfa.bundle``'s JSON with licence and edge3dfa version) is a model ``metadata`` entry
  named ``METADATA_KEY``; ``targets.tflite`` reads it back without the schema module (a Pi has none).
* int8 quantizes the network alone: the uint8 -> float pre-processing and the post-processing (everything not
  under the bundle's ``net`` attribute) stay float, and by default the params layer too, as for params artifacts
  (``int8`` module docstring). Calibration feeds the uint8 images of the calibration crops.
* The detector bundle ends before NMS (litert-torch lowers nothing to TFLite's NON_MAX_SUPPRESSION_V4/V5): the
  contract says NMS is the app's, and ``edge3dfa.runtime.detect.nms`` is the reference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa.bundle import METADATA_KEY
from edge3dfa.converters.tflite.export import NAME_SCOPE, replace_squeeze_excite
from edge3dfa.converters.tflite.int8 import TFLiteInt8Builder, scope_attributes
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import native_output, one_line

if TYPE_CHECKING:
    from edge3dfa.converters.tflite import TFLiteOptions
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

#: the model metadata entry with the source model, precision and edge3dfa version
PROVENANCE_NAME = "edge3dfa"
#: the bundle module's attribute that holds the network (edge3dfa.models.bundle): what int8 quantizes
NETWORK_ATTRIBUTE = "net"


def contract(source: Checkpoint, input_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """The bundle contract of ``source`` (a detector at ``input_hw``): what the manifest's ``bundle`` field and the
    file's ``METADATA_KEY`` entry both hold."""
    from edge3dfa import bundle

    channels = source.bundle.channels
    if source.is_detector:
        return bundle.detector_contract(*input_hw, channels=channels, layout="NHWC", nms=None)
    return bundle.regressor_contract(channels, "NHWC")


def provenance(source: Checkpoint, precision: str) -> dict[str, Any]:
    """What else the file records (``PROVENANCE_NAME``): which weights, which precision, which edge3dfa."""
    from edge3dfa import __version__

    return {"model": source.name, "arch": source.arch, "precision": precision, "source_sha256": source.sha256,
            "edge3dfa_version": __version__}


def output_names(detector: bool) -> tuple[str, ...]:
    from edge3dfa import bundle

    return bundle.DETECTOR_OUTPUTS if detector else bundle.OUTPUTS


def bundle_flatbuffer(source: Checkpoint, input_hw: tuple[int, int]) -> bytes:
    """``source.bundle_module("NHWC")`` (a detector at ``input_hw``) -> float flatbuffer with named I/O, no
    metadata yet (``finalise`` adds it after any quantization)."""
    import torch

    from edge3dfa import bundle

    with native_output():  # TensorFlow's absl / oneDNN banners on import
        import litert_torch
    litert_torch.config.show_progress = False
    module = replace_squeeze_excite(source.bundle_module("NHWC", input_hw if source.is_detector else None))
    names = output_names(source.is_detector)

    class Named(torch.nn.Module):
        __module__ = NAME_SCOPE

        def __init__(self) -> None:
            super().__init__()
            self.bundle = module

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(zip(names, self.bundle(image)))

    sample = {bundle.INPUT_NAME: torch.zeros(1, *input_hw, 3, dtype=torch.uint8)}
    kind = "detector" if source.is_detector else "regressor"
    image = np.random.default_rng(0).integers(0, 256, (1, *input_hw, 3), dtype=np.uint8)
    with torch.no_grad():
        want = [t.numpy() for t in module(torch.from_numpy(image))]
    for flags in CONVERT_TRIES:
        try:
            content = litert_torch.signature(kind, Named().eval(), sample_kwargs=sample).convert(**flags)
        except Exception as e:  # noqa: BLE001 - export and MLIR passes raise many types; one line for the user
            raise Edge3dfaError(f"litert-torch could not convert the bundle: {one_line(e)}") from e
        content = content.model_content()
        if _same_outputs(content, kind, image, dict(zip(names, want))):
            return content
    raise Edge3dfaError(f"litert-torch converted the bundle {len(CONVERT_TRIES)} ways, each with outputs unlike "
                        "PyTorch's on a test image; not written")


#: litert-torch 0.10 sometimes (depending on the process's earlier work) merges two distinct same-shape constants of
#: the detector bundle (the priors' centres and sizes) into one, a graph that runs but is wrong: each conversion is
#: checked against PyTorch and tried again with these converter flags in turn
CONVERT_TRIES = ({}, {"lightweight_conversion": True}, {"runtime_constant_folding": True})


def _same_outputs(content: bytes, signature: str, image: np.ndarray, want: dict[str, np.ndarray]) -> bool:
    """Whether the flatbuffer's outputs on ``image`` equal PyTorch's ``want`` within float32 rounding."""
    from edge3dfa.converters.tflite.int8 import _interpreter

    got = _interpreter(content).get_signature_runner(signature)(image=image)
    return all(np.abs(got[k] - v).max() <= 1e-4 * (1.0 + np.abs(v).max()) for k, v in want.items())


def finalise(content: bytes, entries: dict[str, dict[str, Any]]) -> bytes:
    """Rename the signature's I/O tensors to their signature names and store each of ``entries`` as a JSON
    metadata entry of that name (replacing one already there)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    for sig in model.signatureDefs or []:
        graph = model.subgraphs[sig.subgraphIndex]
        for tmap in list(sig.inputs or []) + list(sig.outputs or []):
            graph.tensors[tmap.tensorIndex].name = tmap.name
    metadata = [m for m in (model.metadata or []) if _text(m.name) not in entries]
    for name, value in entries.items():
        buf = schema.BufferT()
        buf.data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
        meta = schema.MetadataT()
        meta.name, meta.buffer = name, len(model.buffers)
        model.buffers.append(buf)
        metadata.append(meta)
    model.metadata = metadata
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def network_tensors(content: bytes) -> tuple[list[str], list[str]]:
    """(output tensors of the network's ops, output tensors of every other op: pre- and post-processing), by the
    module path litert-torch writes into each name (``Named/<bundle>/<net>/...``)."""
    from edge3dfa.converters.tflite.int8 import _graph_ops, _interpreter

    interp = _interpreter(content)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    net, other = [], []
    for op in _graph_ops(interp):
        outs = [names[o] for o in op["outputs"]]
        (net if in_network(outs[0]) else other).extend(outs)
    return net, other


def in_network(tensor: str) -> bool:
    """Whether a litert-torch tensor name's first scope lies under the bundle's ``net`` attribute."""
    scope = tensor.split(";", 1)[0]
    attrs = scope_attributes(scope)
    return len(attrs) > 1 and attrs[1] == NETWORK_ATTRIBUTE


def last_network_layer(content: bytes, network: list[str]) -> list[str]:
    """Output tensors of the network's last weighted op and any network op after it (the params layer)."""
    from edge3dfa.converters.tflite.int8 import _WEIGHTED, _graph_ops, _interpreter

    interp = _interpreter(content)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    wanted = set(network)
    chain: list[str] = []
    for op in _graph_ops(interp):
        outs = [names[o] for o in op["outputs"]]
        if not wanted.intersection(outs):
            continue
        if op["op_name"] in _WEIGHTED:
            chain = []
        chain.extend(outs)
    return chain


def write_bundle(source: Checkpoint, dest: Path, precision: str, options: TFLiteOptions,
                 calibration: CalibrationSet | None) -> dict[str, Any]:
    """Write the fp32 or int8 bundle of ``source`` at ``dest``; returns the manifest fields."""
    from edge3dfa.converters.tflite.export import CROP_SIZE

    if precision == "int8":
        return BundleInt8Builder(source, options, calibration).export(dest)
    t0 = time.perf_counter()
    hw = options.detector_size if source.is_detector else CROP_SIZE
    content = bundle_flatbuffer(source, hw)
    return write_bundle_artifact(content, source, dest, precision, options, [], time.perf_counter() - t0)


def write_bundle_artifact(content: bytes, source: Checkpoint, dest: Path, precision: str, options: TFLiteOptions,
                          notes: list[str], seconds: float) -> dict[str, Any]:
    """Fix op versions, store names and contract (``finalise``), write ``dest``; returns the manifest fields."""
    from edge3dfa.converters.tflite import gpu
    from edge3dfa.converters.tflite.export import CROP_SIZE, used_options
    from edge3dfa.converters.tflite.opversions import inspect_ops, runtime_notes
    from edge3dfa.manifest import tool_versions

    detector = source.is_detector
    hw = options.detector_size if detector else CROP_SIZE
    c = contract(source, hw)
    content, info = inspect_ops(content, fix_versions=True)
    content = finalise(content, {METADATA_KEY: c, PROVENANCE_NAME: provenance(source, precision)})
    dest.write_bytes(content)
    kind = "detector" if detector else "regressor"
    names = output_names(detector)
    refused = gpu.gpu_findings(content)
    ops = ", ".join(f"{k} {v}" for k, v in info["ops"].items())
    notes = [f"phone bundle (edge3dfa.bundle): signature {kind!r}, input 'image' (uint8 NHWC "
             f"{c['input']['channel_order']}), outputs {', '.join(repr(n) for n in names)}; the contract JSON is "
             f"the file's metadata entry {METADATA_KEY!r}", *notes,
             f"graph: {info['op_count']} ops ({ops}); converted in {seconds:.1f} s", *runtime_notes(info)]
    if detector:
        notes.append("no NMS in the graph (litert-torch lowers nothing to NON_MAX_SUPPRESSION_V4/V5): boxes and "
                     "scores of every prior; NMS in the app as the contract's 'nms' says")
    if refused:
        notes.append(f"GPU delegate: these ops fall back to the CPU (TensorFlow's gpu_compatibility rules): "
                     f"{gpu.summary(refused)}; the {'plain FaceBoxes' if detector else 'params'} artifact is "
                     "the accelerator path (convert without --bundle)")
    else:
        notes.append("GPU delegate: every op within TensorFlow's gpu_compatibility rules")
    return {
        "options": {**used_options(options, precision, detector), "bundle": source.bundle.to_dict(),
                    "signature": kind},
        "input": c["input"], "output": {"name": ", ".join(names), **c["outputs"]}, "bundle": c, "notes": notes,
        "min_runtime": {"tflite-runtime": info["min_tflite_runtime"], "ai-edge-litert": "1.0.0"},
        "tools": tool_versions("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    }


class BundleInt8Builder(TFLiteInt8Builder):
    """A regressor bundle with its network int8 and everything else float: pre-processing (CAST, normalisation),
    post-processing, and the params layer unless ``params_layer="int8"``; calibrated on uint8 images."""

    def __init__(self, source: Checkpoint, options: TFLiteOptions, calibration: CalibrationSet | np.ndarray | None,
                 work: Path | None = None) -> None:
        from edge3dfa import bundle
        from edge3dfa.converters.tflite.export import CROP_SIZE
        from edge3dfa.converters.tflite.int8 import calibrate, clip_ranges, layer_units
        from edge3dfa.converters.tflite.opversions import inspect_ops
        from edge3dfa.datasets.calibration import crops_of

        if calibration is None:
            raise Edge3dfaError("int8 needs a calibration set")
        if source.is_detector:
            raise Edge3dfaError("int8 detector bundles need calibration photos; the shared set is face crops")
        self.source, self.options, self.detector = source, options, False
        t0 = time.perf_counter()
        self.content = bundle_flatbuffer(source, CROP_SIZE)
        network, self.outside = network_tensors(self.content)
        self.params_layer = (last_network_layer(self.content, network)
                             if options.params_layer_precision == "float" else [])
        self.hard_swish = "HARD_SWISH" in inspect_ops(self.content)[1]["ops"]
        self.layers = layer_units(self.content, set(self.params_layer) | set(self.outside))
        q, _ = self._recipe(())
        images = bundle.to_image_uint8(crops_of(calibration), source.bundle.channels, "NHWC")
        keep = set(self.params_layer) | set(self.outside)
        self.qsvs = clip_ranges(self.content, calibrate(self.content, q, images), images, options, keep)
        self.seconds = time.perf_counter() - t0

    def _recipe(self, keep_float: Sequence[str]) -> tuple[Any, list[str]]:
        from edge3dfa.converters.tflite.int8 import int8_recipe

        tensors = self.outside + [t for k in keep_float for t in self.layers[k]]
        q, notes = int8_recipe(self.content, self.options, self.params_layer, self.hard_swish, tensors)
        return q, ["int8 bundle: the network int8; the uint8 -> float pre-processing and the post-processing "
                   "(landmarks, pose, params) float", *notes]

    def _write(self, content: bytes, dest: Path, notes: list[str], seconds: float) -> dict[str, Any]:
        return write_bundle_artifact(content, self.source, dest, "int8", self.options, notes, seconds)
