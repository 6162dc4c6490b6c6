"""Which TFLite runtime can run an artifact: op versions as TFLite's own converter would write them.

ai-edge-quantizer leaves op versions as they were in the float model, which lets an old runtime load a kernel it
cannot run (tflite-runtime 2.14 silently zeroes a per-channel dynamic-range FULLY_CONNECTED). ``inspect_ops`` works
out the version each op needs from its tensor types (tensorflow/lite/tools/versioning/op_version.cc), can raise the
declared versions to that, so such a runtime refuses the model instead, and names the oldest runtime that
implements every (op, version) (runtime_version.cc): the manifest's ``min_runtime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: the last tflite-runtime wheel (what a Raspberry Pi gets from PyPI); newer devices use ai-edge-litert
PI_RUNTIME = "2.14.0"

#: First TFLite runtime that implements each (op, version): tensorflow/lite/tools/versioning/runtime_version.cc,
#: for the ops these models use (index = version - 1).
RUNTIME_OF = {
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
#: ops whose int8 kernel is version 2 (op_version.cc)
INT8_V2 = {"ADD", "MEAN", "PAD", "PADV2", "CONCATENATION", "SOFTMAX", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RELU",
           "RELU6", "LOGISTIC", "TRANSPOSE"}
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def version_tuple(v: str) -> tuple[int, ...]:
    """``"2.14.0"`` -> ``(2, 14, 0)``, for comparing runtime versions."""
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True)
class OpUse:
    """What decides one operator's version: its (input, weight, output) tensor types and quantization."""

    op: str
    types: tuple[str, str, str]
    per_channel: bool
    options: Any
    mul_scales: tuple[float, float, float] | None


def required_version(use: OpUse) -> int:
    """The version TFLite's converter gives this use of an op (op_version.cc)."""
    op, (i0, i1, o0), per_channel, options, mul = use.op, use.types, use.per_channel, use.options, use.mul_scales
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
        return 3 if mul and all(mul) and mul[0] * mul[1] / mul[2] >= 1 else 2
    if op == "QUANTIZE":
        return 3 if per_channel else 2 if o0 == "INT16" else 1
    if op == "DEQUANTIZE":
        return (5 if per_channel else 2) if i0 == "INT8" else 3 if i0 in ("INT16", "FLOAT16") else 1
    if op in INT8_V2 and i0 == "INT8":
        return 2
    return 1


class _Graph:
    """Tensor types and scales of one subgraph, by tensor index (-1: an absent optional input)."""

    def __init__(self, graph: Any, type_names: dict[int, str]) -> None:
        self.tensors, self.type_names = graph.tensors, type_names

    def type(self, i: int) -> str:
        return self.type_names.get(self.tensors[i].type, "?") if i >= 0 else "NONE"

    def scales(self, i: int) -> list[float]:
        q = self.tensors[i].quantization if i >= 0 else None
        return [] if q is None or q.scale is None else list(np.ravel(q.scale))

    def use(self, name: str, op: Any) -> OpUse:
        ins, outs = list(op.inputs), list(op.outputs)
        types = (self.type(ins[0]) if ins else "NONE", self.type(ins[1]) if len(ins) > 1 else "NONE",
                 self.type(outs[0]) if outs else "NONE")
        weight = 1 if name in _WEIGHTED else 0
        per_channel = len(self.scales(ins[weight] if weight < len(ins) else -1)) > 1 if ins else False
        if name == "QUANTIZE":
            per_channel = len(self.scales(outs[0])) > 1
        mul = None
        if name == "MUL" and len(ins) > 1:
            s = [self.scales(ins[0]), self.scales(ins[1]), self.scales(outs[0])]
            mul = tuple(x[0] for x in s) if all(s) else None
        return OpUse(name, types, per_channel, op.builtinOptions, mul)


def _needed_versions(model: Any, codes: list[str], schema: Any) -> tuple[list[int], dict[str, int]]:
    """Per operator code the version its uses need (at least the declared one), and the op histogram."""
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    needed = [oc.version for oc in model.operatorCodes]
    counts: dict[str, int] = {}
    for graph in model.subgraphs:
        tensors = _Graph(graph, type_names)
        for op in graph.operators:
            name = codes[op.opcodeIndex]
            counts[name] = counts.get(name, 0) + 1
            needed[op.opcodeIndex] = max(needed[op.opcodeIndex], required_version(tensors.use(name, op)))
    return needed, counts


def inspect_ops(content: bytes, fix_versions: bool = False) -> tuple[bytes, dict[str, Any]]:
    """Op histogram, op versions and the oldest TFLite runtime that runs the model.

    With ``fix_versions`` the opcode versions are raised to what the ops need (see module docstring) and the
    re-serialised model is returned. Uses the flatbuffer schema that ships with ai-edge-litert.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [op_names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM") for oc in model.operatorCodes]
    needed, counts = _needed_versions(model, codes, schema)
    declared, required = {}, {}
    runtime, unknown = "1.0.0", []
    for oc, name, version in zip(model.operatorCodes, codes, needed):
        required[name] = max(required.get(name, 0), version)
        declared[name] = max(declared.get(name, 0), max(oc.version, version) if fix_versions else oc.version)
        table = RUNTIME_OF.get(name, ())
        if version > len(table):
            unknown.append(f"{name} v{version}")
            continue
        runtime = max(runtime, table[version - 1], key=version_tuple)
    if fix_versions:
        for oc, version in zip(model.operatorCodes, needed):
            oc.version = max(oc.version, version)
        content = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    info = {"op_count": sum(counts.values()), "ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "op_versions": dict(sorted(declared.items())), "required_versions": dict(sorted(required.items())),
            "min_tflite_runtime": runtime, "unknown": unknown}
    return content, info


def runtime_notes(info: dict[str, Any]) -> list[str]:
    """Manifest notes from ``inspect_ops``'s info: a warning when the Pi's tflite-runtime cannot load the model,
    and the ops whose minimum runtime the table does not know."""
    notes = []
    runtime = info["min_tflite_runtime"]
    if version_tuple(runtime) > version_tuple(PI_RUNTIME):
        late = [f"{k} v{v}" for k, v in info["required_versions"].items()
                if k in RUNTIME_OF and v <= len(RUNTIME_OF[k])
                and version_tuple(RUNTIME_OF[k][v - 1]) > version_tuple(PI_RUNTIME)]
        notes.append(f"WARNING: will not load in tflite-runtime {PI_RUNTIME} (the Raspberry Pi wheel): "
                     f"{', '.join(late)} needs TFLite {runtime}; run it with ai-edge-litert")
    if info["unknown"]:
        notes.append(f"minimum runtime unknown for {', '.join(info['unknown'])}")
    return notes
