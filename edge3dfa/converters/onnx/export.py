"""torch -> a checked, constant-folded, self-contained .onnx file, and the manifest fields that describe it.

Export uses the TorchScript exporter (``dynamo=False``) by default: on these CNNs it gives the cleanest
graph (BN folded into Conv at export, GlobalAveragePool + Flatten, module-path node names such as
``/dw5_1/conv_sep/Conv`` that ``exclude=`` can name), byte-identical bytes run to run, in 1-2 s instead
of 4-20 s. ``exporter="dynamo"`` is offered (same parity; opaque node names). Then onnxruntime's offline
*basic* optimisation (the one level that only emits standard ONNX ops) folds the scalar Constant nodes into
initializers, so the file is what onnxruntime would build at load time anyway, and what
``quant_pre_process`` would produce; no extra dependency (onnxslim) is needed for these graphs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge3dfa import __version__, runtime
from edge3dfa.converters.onnx import DETECTOR_BUNDLE_SIZE, OPSET
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions

if TYPE_CHECKING:
    from edge3dfa.converters.onnx import OnnxOptions
    from edge3dfa.models import Checkpoint

# First onnxruntime release implementing each ONNX opset (onnxruntime docs, compatibility matrix).
_ORT_FOR_OPSET = {13: "1.7", 14: "1.8", 15: "1.9", 16: "1.11", 17: "1.13", 18: "1.14", 19: "1.15",
                  20: "1.17", 21: "1.18"}
_ORT_FOR_IR = {7: "1.7", 8: "1.11", 9: "1.15", 10: "1.18"}


def write_float(source: Checkpoint, dest: Path, options: OnnxOptions, work: Path) -> dict[str, Any]:
    """The fp32 artifact ``dest`` (intermediate files in ``work``); its manifest fields."""
    options = options.for_task(source.is_detector)
    fp32 = float_graph(source, options, work)
    proto = finalise(fp32, dest, metadata(source, "fp32", options))
    if source.bundle is not None:
        return bundle_fields(proto, source)
    return fields(proto, source.is_detector, options)


def float_graph(source: Checkpoint, options: OnnxOptions, work: Path) -> Path:
    """torch -> checked, shape-inferred, constant-folded fp32 ONNX in ``work``."""
    try:
        import onnx
    except ImportError as e:
        raise Edge3dfaError(f"the onnx converter needs onnx and onnxruntime ({e}); pip install 'edge3dfa[onnx]'") from e
    raw, fp32 = work / "raw.onnx", work / "fp32.onnx"
    if source.bundle is not None:
        raw.write_bytes(bundle_to_onnx(source, options.opset))
    else:
        raw.write_bytes(torch_to_onnx(source.load(), source.is_detector, options.head, options.exporter,
                                      options.opset))
    onnx.checker.check_model(str(raw))
    onnx.save_model(onnx.shape_inference.infer_shapes(onnx.load(str(raw)), strict_mode=True), str(raw))
    ort_basic_optimise(raw, fp32)
    return fp32


def torch_to_onnx(model: Any, detector: bool, head: str, exporter: str, opset: int) -> bytes:
    """The serialized ModelProto of ``model`` (with the fused landmark head when ``head="landmarks"``)."""
    import torch

    if head == "landmarks":
        from edge3dfa.converters.onnx.head import landmark_head_module

        model = landmark_head_module(model)
    outputs = ["loc", "conf"] if detector else ["landmarks" if head == "landmarks" else "params"]
    shape = (1, 3, 480, 640) if detector else (1, 3, runtime.INPUT_SIZE, runtime.INPUT_SIZE)
    dummy = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; we chose it on purpose
        if exporter == "torchscript":
            axes = {"input": {0: "N", 2: "H", 3: "W"} if detector else {0: "N"}}
            axes.update({name: {0: "N", 1: "P"} if detector else {0: "N"} for name in outputs})
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


def bundle_to_onnx(source: Checkpoint, opset: int) -> bytes:
    """The serialized ModelProto of a bundle (``Checkpoint.bundle_module``), uint8 NHWC ``image`` in, TorchScript
    exporter (module-path node names): a regressor gives ``landmarks``, ``pose``, ``params`` with a dynamic batch;
    FaceBoxes, at the fixed ``DETECTOR_BUNDLE_SIZE``, ``boxes`` and ``scores`` after NMS (``nms.append_nms``)."""
    import torch

    from edge3dfa import bundle

    if source.is_detector:
        from edge3dfa.converters.onnx.nms import append_nms

        h, w = DETECTOR_BUNDLE_SIZE
        dummy = torch.zeros((1, h, w, 3), dtype=torch.uint8)
        raw = _export(source.bundle_module("NHWC", (h, w)), dummy, ["prior_boxes", "prior_scores"], {}, opset)
        return append_nms(raw, bundle.DETECTOR_OUTPUTS)
    size = runtime.INPUT_SIZE
    dummy = torch.zeros((1, size, size, 3), dtype=torch.uint8)
    names = list(bundle.OUTPUTS)
    return _export(source.bundle_module("NHWC"), dummy, names,
                   {n: {0: "N"} for n in [bundle.INPUT_NAME, *names]}, opset)


def _export(module: Any, dummy: Any, names: list[str], axes: dict[str, dict[int, str]], opset: int) -> bytes:
    import torch

    from edge3dfa import bundle

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), buf, input_names=[bundle.INPUT_NAME], output_names=names,
                          opset_version=opset, dynamo=False, do_constant_folding=True, dynamic_axes=axes or None)
    return buf.getvalue()


def contract(source: Checkpoint) -> dict[str, Any]:
    """The contract of ``source``'s bundle (``edge3dfa.bundle``), as the file and its manifest store it."""
    from edge3dfa import bundle
    from edge3dfa.converters.onnx.nms import nms_rules

    if source.is_detector:
        return bundle.detector_contract(*DETECTOR_BUNDLE_SIZE, source.bundle.channels, "NHWC", nms=nms_rules())
    return bundle.regressor_contract(source.bundle.channels)


def ort_basic_optimise(src: Path, dest: Path) -> None:
    """onnxruntime's offline basic-level optimisation (constant folding, redundant nodes; standard ops only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dest)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def metadata(source: Checkpoint, precision: str, options: OnnxOptions) -> dict[str, str]:
    """What the artifact itself records (``metadata_props``, prefixed ``edge3dfa.``); a bundle's contract as
    JSON under ``edge3dfa.bundle``."""
    if source.bundle is not None:
        import json

        terms = contract(source)
        return {"model": source.name, "arch": source.arch, "precision": precision, "source_sha256": source.sha256,
                "bundle": json.dumps(terms, sort_keys=True), "licence": terms["licence"], "version": __version__,
                "contract_version": str(terms["version"])}
    return {"model": source.name, "arch": source.arch, "precision": precision,
            "head": "faceboxes" if source.is_detector else options.head, "source_sha256": source.sha256}


def finalise(src: Path, dest: Path, meta: dict[str, str]) -> Any:
    """Prune the unused opset domains onnxruntime adds, stamp metadata (and a bundle's input and output meanings
    as the doc_string of each, from its contract), check, save as ONE file."""
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
    if "bundle" in meta:
        _document(model.graph, meta["bundle"])
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(dest), save_as_external_data=False)
    return model


def _document(graph: Any, contract_json: str) -> None:
    """Each input's and output's meaning (the contract's ``meaning``, with dtype, shape and units) as its
    doc_string, so a viewer such as Netron shows the contract on the tensors themselves."""
    import json

    terms = json.loads(contract_json)
    specs = {terms["input"]["name"]: terms["input"], **terms["outputs"]}
    for value in [*graph.input, *graph.output]:
        spec = specs.get(value.name)
        if spec is not None:
            shape = "[" + ",".join(str(d) for d in spec["shape"]) + "]"
            nms = f"; NMS {terms['nms']}" if "nms" in terms and value.name in terms["outputs"] else ""
            value.doc_string = f"{value.name} {spec['dtype']} {shape}: {spec['meaning']}{nms}"


def min_onnxruntime(model: Any) -> str:
    """Oldest onnxruntime release that implements the model's opset and IR version."""
    opset = max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=OPSET)
    need = [_ORT_FOR_OPSET.get(opset, "1.20"), _ORT_FOR_IR.get(model.ir_version, "1.20")]
    return max(need, key=lambda v: tuple(int(p) for p in v.split(".")))


def fields(proto: Any, detector: bool, options: OnnxOptions, quantized: dict[str, Any] | None = None,
           quantized_notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest fields of an ONNX artifact; a quantizer adds the options it used and its notes."""
    used = {"exporter": options.exporter, "opset": options.opset, "head": options.head,
            "graph_optimisation": "onnxruntime offline basic (constant folding); BN folded at export",
            **(quantized or {})}
    notes = ["single self-contained file (no external .onnx.data)", "dynamic batch (dim 'N')"]
    if detector:
        notes.append("dynamic H, W: run on any blob from edge3dfa.runtime.detect.prepare; priors depend on H, W")
    notes.extend(quantized_notes)
    if options.head == "landmarks":
        notes.append("fused landmark head: outputs 68 landmarks, not params; Target.predict does not apply, use run()")
    inp, out = _descriptions(detector, options.head)
    return {"options": used, "input": inp, "output": out, "notes": notes,
            "tools": tool_versions("torch", "onnx", "onnxruntime"),
            "min_runtime": {"onnxruntime": min_onnxruntime(proto)}}


def bundle_fields(proto: Any, source: Checkpoint, quantized: dict[str, Any] | None = None,
                  quantized_notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest fields of an ONNX bundle (regressor or detector, float or quantized)."""
    from edge3dfa import bundle

    terms = contract(source)
    names = bundle.DETECTOR_OUTPUTS if source.is_detector else bundle.OUTPUTS
    if source.is_detector:
        notes = ["phone bundle: uint8 photo in, boxes/scores out after NMS (edge3dfa.bundle)",
                 f"fixed input {terms['input']['shape']}: photos are shrunk and padded to it "
                 "(edge3dfa.runtime.detect.prepare)", "NMS: " + terms["nms"]]
    else:
        notes = ["phone bundle: uint8 image in, landmarks/pose/params out (edge3dfa.bundle)", "dynamic batch (dim 'N')"]
    if quantized:
        notes.append("only the network is quantized: the uint8 -> float pre-processing and the post-processing "
                     "(/head/ nodes) stay float")
    return {"options": {"opset": proto.opset_import[0].version, "bundle": source.bundle.to_dict(), **(quantized or {})},
            "input": terms["input"], "output": {"name": ", ".join(names), **terms["outputs"]},
            "bundle": terms, "notes": [*notes, "single self-contained file", *quantized_notes],
            "tools": tool_versions("torch", "onnx", "onnxruntime"),
            "min_runtime": {"onnxruntime": min_onnxruntime(proto)}}


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
