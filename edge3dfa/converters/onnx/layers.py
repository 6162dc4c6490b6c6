"""Layers of an ONNX graph for int8: which nodes form a layer, which stay float, and how much each layer loses.

A layer is a weighted op (Conv/Gemm/MatMul with an initializer weight) with the elementwise ops after it up to the
next weighted op; the TorchScript exporter names nodes by module path (``/dw2_1/conv_dw/Conv``), so layers are
named like the model's modules. Per-layer loss is onnxruntime's own ``qdq_loss_debug`` (SQNR of each tensor).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa.converters.onnx.head import HEAD_PREFIX
from edge3dfa.errors import Edge3dfaError

if TYPE_CHECKING:
    from edge3dfa.converters.onnx import OnnxOptions

WEIGHTED = {"Conv", "Gemm", "MatMul"}
#: node-name prefix of the network inside a bundle's TorchScript export (``models.bundle``'s attribute ``net``)
BUNDLE_NET_PREFIX = "/net/"


def onnx_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _is_weighted(node: Any, inits: set[str]) -> bool:
    return node.op_type in WEIGHTED and any(i in inits for i in node.input[1:])


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
        if _is_weighted(node, inits):
            return tail
        tensor = node.input[0]
    return []  # no weighted op near the output: nothing to keep in float


def layer_units(graph: Any, skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Candidate layers for mixed precision, in graph order: each weighted op (Conv/Gemm/MatMul) with the
    elementwise ops after it up to the next weighted op (activation, hard-swish, SE multiply, residual Add).

    Keeping a layer float excludes all of its nodes, so no quantize/dequantize pair is left between a float
    op and its activation. Nodes in ``skip`` (already float) and the fused head are not candidates.
    """
    skip = set(skip)
    inits = {i.name for i in graph.initializer}
    units: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for n in graph.node:
        if n.name in skip or n.name.startswith(HEAD_PREFIX):
            continue
        if _is_weighted(n, inits):
            current = n.name
            units[current] = pending
            pending = []
        (units[current] if current else pending).append(n.name)
    return units


def always_float(graph: Any, options: OnnxOptions) -> list[str]:
    """The nodes every int8 variant keeps float: ``exclude`` (which must name nodes of this graph: a typo would
    silently quantize everything), the fused head and, with ``float_output`` / ``float_input``, the output layer /
    the first layer."""
    nodes = [n.name for n in graph.node]
    for name in options.excluded:
        if name not in nodes:
            close = difflib.get_close_matches(name, nodes, n=3) or nodes[:3]
            raise Edge3dfaError(f"exclude: no node named {name!r} in the graph; e.g. {', '.join(close)}")
    out = set(options.excluded) | {n for n in nodes if n.startswith(HEAD_PREFIX)} | set(bundle_pre_processing(graph))
    if options.float_output:
        out |= set(float_tail(graph))
    if options.float_input:
        out |= set(next(iter(layer_units(graph).values()), []))
    return sorted(out)


def bundle_pre_processing(graph: Any) -> list[str]:
    """A bundle's uint8 -> float pre-processing (Cast, Transpose, Sub, Mul: every node outside the network, which
    the bundle module holds as ``net``, and outside the head), kept float: quantizing it would round the exact
    normalisation of the crop to 8 bits again. Empty for a params graph (float input)."""
    import onnx

    if not graph.input or graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return []
    return [n.name for n in graph.node if not n.name.startswith((BUNDLE_NET_PREFIX, HEAD_PREFIX))]


def layer_sqnr(layers: dict[str, list[str]], graph: Any, quantized: Path, float_model: Path, x: np.ndarray,
               work: Path, channels: str | None = None) -> dict[str, float]:
    """SQNR (dB) of each layer's output in ``quantized`` against ``float_model`` (whose ``graph`` the ``layers``
    come from), on crops ``x`` (onnxruntime's qdq_loss_debug: both graphs run with optimisations off, every tensor
    kept)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    qdq, flt = (activations(p, x, work, channels) for p in (quantized, float_model))
    errors = compute_activation_error(create_activation_matching(qdq, flt))
    out_of = {n.name: n.output[0] for n in graph.node}
    result = {}
    for layer, nodes in layers.items():
        tensor = out_of.get(nodes[-1])
        if tensor in errors and "xmodel_err" in errors[tensor]:
            result[layer] = float(errors[tensor]["xmodel_err"])
    return result


def activations(model: Path, x: np.ndarray, work: Path, channels: str | None = None) -> dict[str, list[np.ndarray]]:
    """Every float tensor of ``model`` on crops ``x`` (16 per run, flattened per run), by tensor name: onnxruntime's
    qdq_loss_debug, which runs the graph with optimisations off, so a QDQ graph computes as fake-quant. A bundle
    (``channels`` its channel order) is fed the uint8 image of the crops."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    from edge3dfa.converters.onnx.int8 import calibration_reader, input_name

    aug = work / f"{model.stem}-debug.onnx"
    modify_model_output_intermediate_tensors(str(model), str(aug))
    try:
        return collect_activations(str(aug), calibration_reader(x, input_name(channels), 16, channels))
    finally:
        aug.unlink()


def attr(node: Any, name: str, default: int) -> int:
    """An integer attribute of ``node``, or ``default``."""
    return next((a.i for a in node.attribute if a.name == name), default)
