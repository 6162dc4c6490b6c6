"""PyTorch -> TFLite (LiteRT): fp32, fp16 weights, dynamic-range int8 and full-integer int8.

Route, chosen by measurement (see the converter's report): litert-torch lowers the torch.export graph to a
float flatbuffer, and ai-edge-quantizer quantizes that flatbuffer. Neither needs TensorFlow, and torch
stays at the project's pin. litert-torch's own PT2E int8 was worse on mb05 (0.96 px mean landmark error vs
0.35) and its MobileNet-V3 graph failed in XNNPACK, so the PT2E quantizer is not used.

Choices made here, each measured:

* Layout: the artifact takes NHWC (``[N,120,120,3]``). The permute to PyTorch's NCHW is folded away by
  the converter (no TRANSPOSE op in the graph); an NCHW artifact keeps a leading TRANSPOSE. The target
  converts the common NCHW call, so every target answers the same ``predict``.
* MobileNet-V3's squeeze-excite ``Linear`` layers are rewritten as the equal 1x1 convolutions on a kept-dim
  mean: the ``x * s[:, :, None, None]`` form fails litert-torch's NHWC layout pass, and the conv form
  leaves no TRANSPOSE and no FULLY_CONNECTED inside the blocks.
* int8 activation ranges are the global min/max over the calibration set (ai-edge-quantizer's default
  moving average clipped outliers: mb05 max param error 2.0 -> 0.2), and the head FULLY_CONNECTED stays
  float unless ``io="int8"``: an int8 params tensor alone costs ~0.6 px on 120x120 crops. HARD_SWISH also
  stays float (XNNPACK has no int8 hard-swish here; the reference kernel made int8 MobileNet-V3 3.7x slower).
  ``io="int8"`` gives a full-integer graph (int8 head and hard-swish too) for integer-only hardware.

Every artifact's ops are checked against TFLite's op-version table: ai-edge-quantizer leaves op versions
as they were in the float model, which lets an old runtime load a kernel it cannot run (tflite-runtime
2.14 silently zeroes a per-channel dynamic-range FULLY_CONNECTED). Versions are raised to what TFLite's
own converter would write, so such a runtime refuses the model, and ``min_runtime`` says which it needs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge3dfa.converters.base import Format
from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
from edge3dfa.options import Options, option

PRECISIONS = ("fp32", "fp16", "dyn-int8", "int8")
SUFFIX = ".tflite"
IO = ("float", "int8")
HEADS = ("float", "int8")
OPTIONS = {"io", "head", "hard_swish", "input_size", "fc_per_channel"}
#: FaceBoxes input the artifact is fixed to (litert-torch exports static shapes): a 640x480 photo as is
DETECTOR_SIZE = (480, 640)
#: the last tflite-runtime wheel (what a Raspberry Pi gets from PyPI); newer devices use ai-edge-litert
PI_RUNTIME = "2.14.0"
#: what --nme-budget tries (see workflows.budget): one configuration; mixed precision does the rest
INT8_CANDIDATES: dict[str, dict[str, Any]] = {"int8": {}}

# ----------------------------------------------------------------------------------------- op versions
# First TFLite runtime that implements each (op, version): tensorflow/lite/tools/versioning/runtime_version.cc,
# for the ops these models use. Which version an op needs: op_version.cc (see _required_version).
_RUNTIME = {
    "CONV_2D": ("1.5.0", "1.14.0", "1.14.0", "2.3.0", "2.4.0", "2.9.0"),
    "DEPTHWISE_CONV_2D": ("1.5.0", "1.12.0", "1.14.0", "2.2.0", "2.3.0", "2.3.0"),
    "FULLY_CONNECTED": ("1.5.0", "1.10.0", "1.14.0", "1.14.0", "2.0.0", "2.1.0", "2.3.0", "2.3.0", "2.3.0",
                        "2.11.0", "2.15.0", "2.17.0", "2.18.0"),
    "ADD": ("1.5.0", "1.14.0", "2.4.0", "2.6.0"),
    "MUL": ("1.5.0", "1.14.0", "1.15.0", "2.3.0", "2.6.0", "2.11.0", "2.13.0"),
    "MEAN": ("1.6.0", "1.14.0", "2.4.0"),
    "PAD": ("1.5.0", "1.14.0", "2.4.0", "2.6.0"),
    "PADV2": ("1.9.0", "1.14.0", "2.4.0", "2.6.0"),
    "HARD_SWISH": ("1.15.0",),
    "QUANTIZE": ("1.14.0", "1.15.0", "2.7.0"),
    "DEQUANTIZE": ("1.13.1", "1.14.0", "1.15.0", "2.2.0", "2.7.0", "2.18.0"),
    "RESHAPE": ("1.5.0",),
    "CONCATENATION": ("1.5.0", "1.14.0", "2.3.0", "2.14.0"),
    "SOFTMAX": ("1.5.0", "1.14.0", "2.3.0"),
    "MAX_POOL_2D": ("1.5.0", "1.14.0", "2.3.0"),
    "AVERAGE_POOL_2D": ("1.5.0", "1.14.0", "2.3.0"),
    "RELU": ("1.5.0", "2.1.0", "2.5.0"),
    "RELU6": ("1.5.0", "1.14.0", "2.5.0"),
    "LOGISTIC": ("1.14.0", "1.14.0", "2.3.0"),
    "TRANSPOSE": ("1.6.0", "1.14.0", "1.15.0", "2.3.0", "2.4.0", "2.12.0"),
}
_INT8_V2 = {"ADD", "MEAN", "PAD", "PADV2", "CONCATENATION", "SOFTMAX", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RELU",
            "RELU6", "LOGISTIC", "TRANSPOSE"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _required_version(op: str, types: tuple[str, str, str], per_channel: bool, options: Any,
                      mul_scales: tuple[float, float, float] | None) -> int:
    """The version TFLite's converter gives ``op`` for these (input, weight, output) types (op_version.cc)."""
    i0, i1, o0 = types
    hybrid = (i0, i1, o0) == ("FLOAT32", "INT8", "FLOAT32")
    int8 = (i0, i1, o0) == ("INT8", "INT8", "INT8")
    if op == "CONV_2D":
        return 3 if int8 else (5 if per_channel else 2) if hybrid else 1
    if op == "DEPTHWISE_CONV_2D":
        return (6 if per_channel else 4) if hybrid else 3 if int8 else 1
    if op == "FULLY_CONNECTED":
        if hybrid and per_channel:
            return 12
        if options is not None and getattr(options, "keepNumDims", False):
            return 5
        if int8:
            return 4
        if hybrid:
            return 9 if getattr(options, "asymmetricQuantizeInputs", False) else 3
        return 1
    if op == "MUL" and i0 == "INT8":
        return 3 if mul_scales and all(mul_scales) and mul_scales[0] * mul_scales[1] / mul_scales[2] >= 1 else 2
    if op == "QUANTIZE":
        return 3 if per_channel else 2 if o0 == "INT16" else 1
    if op == "DEQUANTIZE":
        return (5 if per_channel else 2) if i0 == "INT8" else 3 if i0 in ("INT16", "FLOAT16") else 1
    if op in _INT8_V2 and i0 == "INT8":
        return 2
    return 1


def inspect_ops(content: bytes, fix_versions: bool = False) -> tuple[bytes, dict[str, Any]]:
    """Op histogram, op versions and the oldest TFLite runtime that runs the model.

    With ``fix_versions`` the opcode versions are raised to what the ops need (see module docstring) and the
    re-serialised model is returned. Uses the flatbuffer schema that ships with ai-edge-litert.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = [op_names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM") for oc in model.operatorCodes]
    needed = [oc.version for oc in model.operatorCodes]
    counts: dict[str, int] = {}
    for graph in model.subgraphs:
        tensors = graph.tensors

        def ttype(i: int, tensors: Any = tensors) -> str:
            return type_names.get(tensors[i].type, "?") if i >= 0 else "NONE"

        def scales(i: int, tensors: Any = tensors) -> list[float]:
            q = tensors[i].quantization if i >= 0 else None
            return [] if q is None or q.scale is None else list(np.ravel(q.scale))

        for op in graph.operators:
            name = codes[op.opcodeIndex]
            counts[name] = counts.get(name, 0) + 1
            ins, outs = list(op.inputs), list(op.outputs)
            types = (ttype(ins[0]) if ins else "NONE", ttype(ins[1]) if len(ins) > 1 else "NONE",
                     ttype(outs[0]) if outs else "NONE")
            weight = 1 if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") else 0
            per_channel = len(scales(ins[weight] if weight < len(ins) else -1)) > 1 if ins else False
            if name == "QUANTIZE":
                per_channel = len(scales(outs[0])) > 1
            mul = None
            if name == "MUL" and len(ins) > 1:
                s = [scales(ins[0]), scales(ins[1]), scales(outs[0])]
                mul = tuple(x[0] for x in s) if all(s) else None
            need = _required_version(name, types, per_channel, op.builtinOptions, mul)
            needed[op.opcodeIndex] = max(needed[op.opcodeIndex], need)
    declared, required = {}, {}
    runtime, unknown = "1.0.0", []
    for oc, name, version in zip(model.operatorCodes, codes, needed):
        required[name] = max(required.get(name, 0), version)
        declared[name] = max(declared.get(name, 0), max(oc.version, version) if fix_versions else oc.version)
        table = _RUNTIME.get(name, ())
        if version > len(table):
            unknown.append(f"{name} v{version}")
            continue
        runtime = max(runtime, table[version - 1], key=_version_tuple)
    if fix_versions:
        for oc, version in zip(model.operatorCodes, needed):
            oc.version = max(oc.version, version)
        content = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    info = {"op_count": sum(counts.values()), "ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "op_versions": dict(sorted(declared.items())), "required_versions": dict(sorted(required.items())),
            "min_tflite_runtime": runtime, "unknown": unknown}
    return content, info


# ---------------------------------------------------------------------------------------------- options
def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise Edge3dfaError(f"tflite option {key}={value!r} is not one of {', '.join(allowed)}")
    return v


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise Edge3dfaError(f"tflite option {key} must be true or false, got {value!r}")


def _size(value: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in (re.split(r"[x,]", value) if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise Edge3dfaError(f"tflite option input_size must be HxW (e.g. 480x640), got {value!r}") from None
    if h < 32 or w < 32:
        raise Edge3dfaError(f"tflite option input_size {h}x{w} is too small (at least 32x32)")
    return h, w


def parse_options(precision: str, detector: bool, options: dict[str, Any]) -> dict[str, Any]:
    """Validated options with defaults; unknown keys and options that do not apply are user errors."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise Edge3dfaError(f"unknown tflite option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}")
    o: dict[str, Any] = {"io": _choice("io", options.get("io", "float"), IO)}
    if o["io"] == "int8" and precision != "int8":
        raise Edge3dfaError(f"io=int8 needs precision int8 (a {precision} model computes in float)")
    head = options.get("head", "int8" if o["io"] == "int8" else "float")
    o["head"] = _choice("head", head, HEADS)
    if o["io"] == "int8" and o["head"] == "float":
        raise Edge3dfaError("io=int8 needs head=int8: a float head would give a float output")
    o["hard_swish"] = _choice("hard_swish", options.get("hard_swish", o["io"]), HEADS)
    if "input_size" in options and not detector:
        raise Edge3dfaError("tflite option input_size is for the detector; regressors take 120x120")
    o["input_size"] = _size(options["input_size"]) if "input_size" in options else DETECTOR_SIZE
    o["fc_per_channel"] = _bool("fc_per_channel", options.get("fc_per_channel", False))
    if detector and precision == "int8":
        raise Edge3dfaError("int8 FaceBoxes needs calibration photos, which the shared set (face crops) is not; "
                            "use fp32, fp16 or dyn-int8 for the detector")
    return o


def check_options(precision: str, detector: bool, options: dict[str, Any]) -> None:
    """Unknown keys and bad values as user errors, before anything is converted (``convert`` asks every format)."""
    parse_options(precision, detector, options)


# ------------------------------------------------------------------------------------------- conversion
def _conv_squeeze_excite(se: Any) -> Any:
    """The same squeeze-excite with its Linear layers as 1x1 convs on a kept-dim mean (see module docstring)."""
    import torch
    from torch import nn

    layers = []
    for layer in se.fc:
        if isinstance(layer, nn.Linear):
            conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(layer.weight[:, :, None, None])
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            layer = conv
        layers.append(layer)

    class ConvSqueezeExcite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.fc(x.mean((2, 3), keepdim=True))

    return ConvSqueezeExcite()


def channels_last_module(model: Any) -> Any:
    """A copy of ``model`` that takes NHWC input, with converter-friendly squeeze-excite blocks."""
    import torch
    from torch import nn

    from edge3dfa.models.mobilenet_v3 import SEModule

    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SEModule):
                setattr(parent, name, _conv_squeeze_excite(child))

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> Any:
            return self.model(x.permute(0, 3, 1, 2))

    return ChannelsLast().eval()


def float_flatbuffer(model: Any, input_hw: tuple[int, int]) -> bytes:
    """torch model (NCHW) -> fp32 TFLite flatbuffer with a [1,H,W,3] input."""
    import litert_torch
    import torch

    litert_torch.config.show_progress = False
    sample = (torch.zeros(1, *input_hw, 3),)
    try:
        return litert_torch.convert(channels_last_module(model), sample).model_content()
    except Exception as e:  # noqa: BLE001 - export and MLIR passes raise many types; one line for the user
        raise Edge3dfaError(f"litert-torch could not convert the model: {str(e).splitlines()[0][:200]}") from e


def _no_quantize(q: Any, operation: Any, regex: str = ".*") -> None:
    from ai_edge_quantizer import qtyping

    q.update_quantization_recipe(regex=regex, operation_name=operation, op_config=qtyping.OpQuantizationConfig(),
                                 algorithm_key="no_quantize")


def _head_tensors(content: bytes) -> list[str]:
    """Output tensor names from the last weighted op (the params head) through to the model output."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    out = interp.get_output_details()[0]["index"]
    ops = {o: op for op in interp._get_ops_details() for o in op["outputs"]}  # noqa: SLF001 - read-only graph walk
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    chain = []
    while out in ops:
        op = ops[out]
        chain.append(names[out])
        if op["op_name"] in ("FULLY_CONNECTED", "CONV_2D"):
            return chain
        out = op["inputs"][0]
    return []


def quantize(content: bytes, precision: str, o: dict[str, Any]) -> tuple[bytes, list]:
    """fp32 flatbuffer -> fp16 / dyn-int8 flatbuffer with ai-edge-quantizer; returns notes too (int8, which
    needs calibration: ``Int8Builder``)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops = qtyping.TFLOperationName
    q = quantizer.Quantizer(bytearray(content))
    notes = []
    if precision == "fp16":
        q.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
        notes.append("fp16: weights stored as float16 (DEQUANTIZE at load, folded by XNNPACK); compute in fp32")
    else:
        q.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8)
        if not o["fc_per_channel"]:
            q.add_dynamic_config(regex=".*", operation_name=ops.FULLY_CONNECTED, num_bits=8,
                                 granularity=qtyping.QuantGranularity.TENSORWISE)
        notes.append("dyn-int8: int8 weights (per-channel conv, per-tensor FULLY_CONNECTED unless fc_per_channel), "
                     "activations quantized at run time; depthwise convs stay float (ai-edge-quantizer has no "
                     "dynamic depthwise kernel)")
    with _bars():
        return bytes(q.quantize(None, enable_progress_report=False).quantized_model), notes


def _int8_recipe(content: bytes, o: dict[str, Any], head: list[str], hard_swish: bool,
                 float_tensors: list[str]) -> tuple[Any, list[str]]:
    """A Quantizer for static int8 with the ``head`` tensors, hard-swish (if the graph has it) and the ops writing
    ``float_tensors`` left float."""
    from ai_edge_quantizer import qtyping, quantizer

    ops = qtyping.TFLOperationName
    q = quantizer.Quantizer(bytearray(content))
    notes = []
    q.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    if o["io"] == "float":
        _no_quantize(q, ops.INPUT)
        _no_quantize(q, ops.OUTPUT)
    if o["hard_swish"] == "float":
        _no_quantize(q, ops.HARD_SWISH)
        if hard_swish:
            notes.append("int8: HARD_SWISH kept float (DEQUANTIZE/QUANTIZE around it): XNNPACK runs no int8 "
                         "hard-swish, and the reference kernel made int8 MobileNet-V3 3.7x slower than this")
    if head or float_tensors:
        # ai-edge-quantizer matches an op's scope: its output tensor names, each followed by ";"
        _no_quantize(q, ops.ALL_SUPPORTED, regex="|".join(f"^{re.escape(name)};" for name in head + float_tensors))
    if head:
        notes.append("int8: every op int8 except the params head, kept float (an int8 params tensor alone "
                     "costs ~0.6 px of landmark error on 120x120 crops)")
    else:
        notes.append("int8: full-integer graph" + (" with int8 input and output" if o["io"] == "int8" else ""))
    return q, notes


def _bars() -> Any:
    """ai-edge-quantizer draws tqdm bars on stderr for every quantize call: fine on a terminal (they vanish),
    dozens of lines in a log when a search builds many variants; so they are shown only on a terminal."""
    return contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())


def _calibrate(content: bytes, q: Any, calibration: np.ndarray) -> Any:
    """Tensor ranges: global min/max over the set (the default moving average (0.95) lets the last samples
    set the ranges and clips)."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(q.get_quantization_recipe())
    name = _input_name(content)
    cal = calibrator.Calibrator(bytes(content), num_threads=os.cpu_count() or 1,
                                qsv_update_func=qsv_utils.min_max_update)
    data = [{name: np.ascontiguousarray(x[None].transpose(0, 2, 3, 1))} for x in calibration]
    with _bars():
        cal.calibrate({"serving_default": data}, rm)
    return cal.get_model_qsvs()


def _short_name(tensor: str) -> str:
    """``.../DepthWiseBlock_dw2_1/torch.nn.modules.conv.Conv2d_conv_dw;1`` -> ``dw2_1/conv_dw``: the module
    path of the last scope in a litert-torch tensor name, as attribute names (ONNX's names say the same)."""
    scope = next((p for p in reversed(tensor.split(";")) if p and not p.isdigit()), tensor)
    attrs = [c.rsplit(".", 1)[-1].split("_", 1)[1] for c in scope.split("/") if "_" in c.rsplit(".", 1)[-1]]
    return "/".join(attrs[1:]) or scope  # attrs[0] is the wrapped model itself


def layer_units(content: bytes, skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Candidate layers for mixed precision, in execution order: each CONV_2D / DEPTHWISE_CONV_2D /
    FULLY_CONNECTED with the ops after it up to the next one; values are the ops' output tensor names."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    units: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for op in interp._get_ops_details():  # noqa: SLF001 - read-only graph walk
        outs = [names[o] for o in op["outputs"]]
        if any(t in skip for t in outs):
            continue
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            current = _short_name(outs[0])
            while current in units:
                current += "'"
            units[current] = pending
            pending = []
        (units[current] if current else pending).extend(outs)
    return units


class Int8Builder(BaseInt8Builder):
    """The float flatbuffer, converted and calibrated once, quantized to int8 as often as asked with different
    ``layers`` kept float (the mixed-precision search builds dozens of variants)."""

    def __init__(self, model: Any, *, source: Any, calibration: Any, work: Any = None, **options: Any) -> None:
        self.detector = bool(getattr(source, "is_detector", False))
        self.o = parse_options("int8", self.detector, options)
        if calibration is None:
            raise Edge3dfaError("int8 needs a calibration set")
        t0 = time.perf_counter()
        self.content = float_flatbuffer(model, (120, 120))
        self.head = _head_tensors(self.content) if self.o["head"] == "float" else []
        self.hard_swish = _has_op(self.content, "HARD_SWISH")
        self.layers = layer_units(self.content, set(self.head))
        q, _ = self._recipe([])
        self.qsvs = _calibrate(self.content, q, crops_of(calibration))
        self.seconds = time.perf_counter() - t0

    def _recipe(self, keep_float: Any) -> tuple[Any, list[str]]:
        tensors = [t for k in keep_float for t in self.layers[k]]
        return _int8_recipe(self.content, self.o, self.head, self.hard_swish, tensors)

    def export(self, dest: str | os.PathLike, keep_float: Any = ()) -> dict[str, Any]:
        """Write ``dest`` with ``keep_float`` layers float; returns its manifest fields (as ``export`` does)."""
        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the graph; e.g. {', '.join(list(self.layers)[:3])}")
        t0 = time.perf_counter()
        q, notes = self._recipe(keep_float)
        with _bars():
            content = bytes(q.quantize(self.qsvs, enable_progress_report=False).quantized_model)
        fields = _write(content, Path(dest), "int8", self.o, self.detector, (120, 120),
                        notes, self.seconds + time.perf_counter() - t0)
        if keep_float:
            fields["options"]["float_layers"] = list(keep_float)
        return fields


def _has_op(content: bytes, name: str) -> bool:
    return name in inspect_ops(content)[1]["ops"]


def _input_name(content: bytes) -> str:
    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(model_content=content).get_signature_list()
    return sig["serving_default"]["inputs"][0]


def _io_descriptions(content: bytes, detector: bool, hw: tuple[int, int]) -> tuple[dict, dict]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    i, outs = interp.get_input_details()[0], interp.get_output_details()
    if detector:
        inp = {"name": "input", "shape": ["N", *hw, 3], "layout": "NHWC", "channel_order": "BGR",
               "normalisation": "x - (104, 117, 123)", "range": [-123.0, 152.0]}
        out = {"name": "loc,conf", "shape": [["N", "P", 4], ["N", "P", 2]], "dtype": "float32",
               "layout": "FaceBoxes SSD offsets and softmax scores; fixed input size, so P is fixed"}
    else:
        inp = {**CANONICAL_INPUT, "shape": ["N", 120, 120, 3], "layout": "NHWC"}
        out = dict(CANONICAL_OUTPUT)
    inp["dtype"] = np.dtype(i["dtype"]).name
    if i["dtype"] != np.float32:
        s, z = i["quantization"]
        inp["quantization"] = {"scale": float(s), "zero_point": int(z), "rule": "q = round(x / scale) + zero_point"}
    if outs[0]["dtype"] != np.float32:
        s, z = outs[0]["quantization"]
        out["dtype"] = np.dtype(outs[0]["dtype"]).name
        out["quantization"] = {"scale": float(s), "zero_point": int(z), "rule": "x = (q - zero_point) * scale"}
    return inp, out


def export(model: Any, dest: Path, precision: str, *, source: Any, calibration: Any = None,
           **options: Any) -> dict[str, Any]:
    """Write ``dest`` (.tflite) and return the manifest fields this format fills."""
    if precision not in PRECISIONS:
        raise Edge3dfaError(f"tflite offers {', '.join(PRECISIONS)}, not {precision!r}")
    detector = bool(getattr(source, "is_detector", False))
    o = parse_options(precision, detector, options)
    if precision == "int8":
        return Int8Builder(model, source=source, calibration=calibration, **options).export(dest)
    hw = o["input_size"] if detector else (120, 120)
    t0 = time.perf_counter()
    content = float_flatbuffer(model, hw)
    notes: list[str] = []
    if precision != "fp32":
        content, notes = quantize(content, precision, o)
    return _write(content, Path(dest), precision, o, detector, hw, notes, time.perf_counter() - t0)


def _write(content: bytes, dest: Path, precision: str, o: dict[str, Any], detector: bool, hw: tuple[int, int],
           notes: list[str], seconds: float) -> dict[str, Any]:
    """Fix op versions, write ``dest`` and return the manifest fields."""
    content, info = inspect_ops(content, fix_versions=True)
    notes = ["layout: NHWC input (the NCHW->NHWC permute folds into the first conv); targets transpose the "
             "canonical NCHW call", *notes]
    dest.write_bytes(content)
    inp, out = _io_descriptions(content, detector, hw)
    ops = ", ".join(f"{k} {v}" for k, v in info["ops"].items())
    notes.append(f"graph: {info['op_count']} ops ({ops}); converted in {seconds:.1f} s")
    runtime = info["min_tflite_runtime"]
    if _version_tuple(runtime) > _version_tuple(PI_RUNTIME):
        late = [f"{k} v{v}" for k, v in info["required_versions"].items()
                if _version_tuple(_RUNTIME[k][v - 1]) > _version_tuple(PI_RUNTIME)]
        notes.append(f"WARNING: will not load in tflite-runtime {PI_RUNTIME} (the Raspberry Pi wheel): "
                     f"{', '.join(late)} needs TFLite {runtime}; run it with ai-edge-litert")
    if info["unknown"]:
        notes.append(f"minimum runtime unknown for {', '.join(info['unknown'])}")
    if detector:
        notes.append(f"detector fixed to {hw[0]}x{hw[1]}: run it through FaceBoxesDetector(input_size={hw}), "
                     "which shrinks and pads each photo to that size")
    return {
        "options": {"io": o["io"], "layout": "NHWC",
                    **({"head": o["head"], "hard_swish": o["hard_swish"]} if precision == "int8" else {}),
                    **({"input_size": list(hw)} if detector else {}),
                    **({"fc_per_channel": o["fc_per_channel"]} if precision == "dyn-int8" else {}),
                    "route": "litert-torch" + ("" if precision == "fp32" else " + ai-edge-quantizer")},
        "input": inp, "output": out, "notes": notes,
        "min_runtime": {"tflite-runtime": runtime, "ai-edge-litert": "1.0.0"},
        "tools": tool_versions("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    }


def extra_parity(path: str | os.PathLike, reference: Any, sets: dict[str, np.ndarray], *,
                 threads: int | None = None) -> dict[str, Any]:
    """FaceBoxes only (regressors get the generic parity): raw outputs and detected boxes vs PyTorch on photos.

    Both run on the same blob, shrunk and padded to the artifact's fixed size as the pipeline does.
    """
    from edge3dfa import assets, runtime
    from edge3dfa.runtime.detect import FaceBoxesDetector, prepare
    from edge3dfa.targets.tflite import TFLiteTarget
    from edge3dfa.targets.torch import TorchTarget

    cand = TFLiteTarget(path, threads=threads)
    if sets or len(cand.interpreter.get_output_details()) != 2:
        return {}
    ref = TorchTarget(reference.path, threads=threads, arch="faceboxes", model=reference.model)
    size = tuple(cand.input_shape[1:])
    out = {}
    for name in ("trump_hillary", "emma"):
        img = runtime.read_image(assets.fetch(name))
        blob, _ = prepare(img, size)
        r, c = ref.run(blob), cand.run(blob)
        boxes = [FaceBoxesDetector(lambda b, t=t: tuple(t.run(b)[:2]), input_size=size)(img) for t in (ref, cand)]
        same = len(boxes[0]) == len(boxes[1])
        out[f"photo {name}"] = {
            "loc_max_abs": float(np.abs(r[0] - c[0]).max()), "conf_max_abs": float(np.abs(r[1] - c[1]).max()),
            "faces": [len(b) for b in boxes], "blob": list(size),
            "box_max_px": float(np.abs(boxes[0][:, :4] - boxes[1][:, :4]).max()) if same and len(boxes[0]) else None}
    return out


# ------------------------------------------------------------------------------------------ the format
@dataclass(frozen=True)
class TFLiteOptions(Options):
    """TFLite options; ``None`` means the default that follows from the others."""

    label = "tflite option"
    io: Literal["float", "int8"] = option("float", "int8: int8 input and output tensors (full-integer graph)")
    head: Literal["float", "int8"] | None = option(None, "int8: the params layer's precision (default: float, "
                                                         "int8 with io=int8)")
    hard_swish: Literal["float", "int8"] | None = option(None, "int8: HARD_SWISH precision (default: as io)")
    input_size: str | None = option(None, "detector only: fixed input HxW (default 480x640)")
    fc_per_channel: bool = option(False, "dyn-int8: per-channel FULLY_CONNECTED weights")


class TFLiteFormat(Format):
    name = "tflite"
    suffix = SUFFIX
    extra = "tflite"
    precisions = PRECISIONS
    default_precisions = PRECISIONS
    Options = TFLiteOptions
    int8_candidates = INT8_CANDIDATES

    @staticmethod
    def _given(options: Options) -> dict[str, Any]:
        return {k: v for k, v in options.to_dict().items() if v is not None}

    def check(self, precision: str, detector: bool, options: Options) -> None:
        super().check(precision, detector, options)
        parse_options(precision, detector, self._given(options))

    def write(self, source: Any, dest: Path, precision: str, options: Options, calibration: Any) -> dict[str, Any]:
        return export(source.load(), dest, precision, source=source, calibration=calibration, **self._given(options))

    def int8_builder(self, source: Any, options: Options, calibration: Any, work: Path) -> Int8Builder:
        return Int8Builder(source.load(), source=source, calibration=calibration, work=work, **self._given(options))

    def extra_parity(self, path: Path, reference: Any, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        return extra_parity(path, reference, sets, threads=threads)
