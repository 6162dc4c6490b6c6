"""PyTorch -> ExecuTorch (.pte, XNNPACK delegate): fp32, fp16 and static int8 (PT2E, XNNPACK quantizer).

Route: ``torch.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` ->
``to_executorch()``; int8 first goes through torchao's PT2E ``prepare_pt2e`` / ``convert_pt2e`` with
ExecuTorch's ``XNNPACKQuantizer`` (int8 symmetric, per-channel weights, histogram activation observers),
calibrated on the shared CalibrationSet crops like every other format. The manifest records which ops the
XNNPACK delegate took and which fell back to ExecuTorch's portable CPU kernels (``options["delegation"]``).

Choices, each measured (README "ExecuTorch"):

* Batch: programs take a dynamic batch up to ``max_batch`` (memory-planned to that size; the target runs larger
  batches in chunks). The export's example batch *is* ``max_batch``: lowering re-runs ATen's conv backend choice
  on fake tensors, whose ``batch >= 16`` test (mkldnn selection) narrows the batch range to what the example
  satisfies, e.g. [2, 15] for an example of 4, so a smaller example would shrink the capacity. The runtime only
  checks a batch against the capacity, so the raised lower bound does not matter; ``_self_check`` runs batch 1
  and ``max_batch`` on every artifact to prove it. ``max_batch=1`` gives a static single-crop program.
* int8 float layers: like ONNX and TFLite, int8 keeps the params layer float (``float_output``; quantizing it
  alone cost +0.25 NME on mb05) and, by default, the first conv (``float_input``), whose input is the full-range
  image (quantizing it too roughly doubled mb05's int8 cost); ``exclude`` keeps any other layer float. Layers
  are named by module path (``dw5_1.conv_dw``, ``features.3.conv.0``, ``fc``): a layer kept float keeps its
  weighted op and the elementwise ops of its quantization pattern (BN, ReLU) float.
* int8 ranges: the quantizer's HistogramObserver and per-channel weights; MinMax ranges and per-tensor weights
  each cost more NME on both mb05 and the MobileNet-V3 fixture (``benchmarks/int8_choices.py``).
* int8 bias correction (``bias_correction``): int8 moves some of the 62 params by a steady amount, the same on
  held-out crops as on the calibration crops, so the params layer's bias can be shifted by int8's mean params
  error on the calibration crops (simulated int8, the PT2E graph in PyTorch; unlabelled crops only). That
  brings the landmarks nearer fp32's, but on mb05 the shift pointed towards the ground truth and removing it
  cost NME, while it lowered the MobileNet-V3 fixture's: so ``auto`` (default) keeps it only where it lowers
  the balanced NME of the held-out crops (``datasets.heldout``), and the manifest records both figures
  (``benchmarks/executorch_int8.py``, README "ExecuTorch").
* hard-swish (``hard_swish``): upstream's MobileNet-V3 writes it out as ``x * relu6(x + 3) / 6``, whose add,
  clamp and mul the quantizer makes int8 (three more re-quantizations per hard-swish). Keeping them float
  (``float``) moved the fixture's landmarks less far from fp32's on the held-out crops but did not lower its
  ground-truth ΔNME there, so int8 stays the default (``benchmarks/executorch_int8.py``).
* fp16 is real fp16 compute (XNNPACK's f16 kernels; the model is exported in half precision with float32 I/O),
  unlike TFLite's fp16 weight storage. ExecuTorch's XNNPACK serializer keeps conv weights fp32
  (``force_fp32`` in its ``op_conv2d``), so the file is barely smaller than fp32: fp16 is opt-in.

The mixed-precision search (``--nme-budget``) rebuilds int8 with different float layers; ``Int8Builder``
calibrates once and gives every variant the observers it shares with that calibration (a variant's observers
see the same float tensors: observers never change the values they watch), so a variant costs one lowering.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edge3dfa.converters.base import Format
from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions
from edge3dfa.options import Options, option

if TYPE_CHECKING:
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

#: what --nme-budget tries (the fastest within budget wins, else layers are kept float): histogram ranges were
#: better on mb05 and mbv3_05, MinMax on mbv3_large_05, whose histogram int8 missed a 0.05 budget on the held-out
#: crops (+0.055) where MinMax met it (+0.024); both run the same kernels (benchmarks/int8_choices.py)
INT8_CANDIDATES: dict[str, dict[str, Any]] = {"int8": {}, "minmax": {"observer": "minmax"}}


@dataclass(frozen=True)
class ExecuTorchOptions(Options):
    """ExecuTorch options; int8's defaults measured in benchmarks/int8_choices.py (module docstring)."""

    label = "executorch option"
    max_batch: int = option(32, "largest batch the program takes (1: a static single crop)")
    float_input: bool = option(True, "int8: keep the first conv float")
    float_output: bool = option(True, "int8: keep the params layer float")
    observer: Literal["histogram", "minmax"] = option("histogram", "int8 activation ranges")
    per_channel: bool = option(True, "int8: per-channel weight scales")
    exclude: tuple[str, ...] = option((), "int8: layers (module paths) kept float, comma separated")
    hard_swish: Literal["float", "int8"] = option("int8", "int8: precision of hand-written hard-swish "
                                                  "x * relu6(x + 3) / 6 (its add, clamp, mul, div)")
    bias_correction: Literal["auto", "on", "off"] = option(
        "auto", "int8: shift the params layer's bias by int8's mean params error on the calibration crops "
        "(auto: where it lowers the held-out crops' NME)")

    def check(self) -> None:
        if not 1 <= self.max_batch <= 1024:
            raise Edge3dfaError(f"executorch option max_batch must be 1..1024, got {self.max_batch}")


# ------------------------------------------------------------------------------------------- conversion
def _frameworks() -> None:
    """Import executorch (and torchao) once, quietly; a clear error when the extra is missing."""
    from edge3dfa.targets.executorch import native_log, quiet_imports

    try:
        with quiet_imports(), native_log():
            import executorch.exir  # noqa: F401
            import torchao.quantization.pt2e  # noqa: F401
            from executorch.backends.xnnpack.partition import xnnpack_partitioner  # noqa: F401
    except ImportError as e:
        raise Edge3dfaError(f"the executorch converter needs executorch ({e.name or e}); "
                            "pip install 'edge3dfa[executorch]'") from e


def _example(max_batch: int) -> tuple[tuple[Any], Any]:
    """Example input and dynamic batch spec (see the module docstring for why the example batch is the maximum)."""
    import torch
    from torch.export import Dim

    x = (torch.zeros(max_batch, 3, 120, 120),)
    return x, (None if max_batch == 1 else ({0: Dim("batch", min=1, max=max_batch)},))


def exported(model: Any, max_batch: int) -> Any:
    """``torch.export`` of ``model`` (eval mode) with the batch dynamic up to ``max_batch``."""
    from torch.export import export
    from torch.fx import GraphModule

    if not isinstance(model, GraphModule):  # a PT2E-converted graph has no train/eval switch (and needs none)
        model.eval()
    x, dynamic = _example(max_batch)
    try:
        return export(model, x, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - export raises many types; one line for the user
        raise Edge3dfaError(f"torch.export could not capture the model: {one_line(e)}") from e


def _half(model: Any) -> Any:
    """The model in half precision behind float32 input and output."""
    from torch import nn

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = copy.deepcopy(model).eval().half()

        def forward(self, x: Any) -> Any:
            return self.model(x.half()).float()

    return Half().eval()


def _coverage(info: Any) -> dict[str, Any]:
    """What the XNNPACK delegate took and what fell back to the portable CPU kernels (``get_delegation_info``)."""
    ops = {k: v for k, v in info.delegation_by_operator.items() if k != "getitem"}
    return {"backend": "XnnpackBackend", "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated": {k: v.delegated for k, v in sorted(ops.items()) if v.delegated},
            "cpu_fallback": {k: v.non_delegated for k, v in sorted(ops.items()) if v.non_delegated}}


def lower(program: Any) -> tuple[bytes, dict[str, Any]]:
    """Exported program -> .pte bytes with XNNPACK delegation, and what the delegate took."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    from edge3dfa.targets.executorch import native_log, quiet_imports

    with quiet_imports(), native_log():
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        buffer = edge.to_executorch().buffer
    return bytes(buffer), _coverage(info)


def _self_check(path: Path, max_batch: int) -> float:
    """Run ``path`` on ``max_batch`` crops at once and on its first crops one at a time: a capacity or dynamic-batch
    mistake fails here, not in a user's pipeline. Returns the max abs difference between the two (float
    summation order may differ with the batch; int8 is exact per sample)."""
    from edge3dfa.targets.executorch import ExecuTorchTarget

    target = ExecuTorchTarget(path, threads=1)
    if target.capacity != max_batch:
        raise Edge3dfaError(f"the lowered program holds batches of {target.capacity}, not max_batch={max_batch}")
    x = np.random.default_rng(0).uniform(-1, 1, (max_batch, 3, 120, 120)).astype(np.float32)
    return _batch_diff(target, x, "program")


def _batch_diff(target: Any, x: np.ndarray, what: str) -> float:
    """Max abs difference of ``target``'s params on the whole batch ``x`` and on its first crops one at a time;
    an error (naming the lowered ``what``) when it is not finite or not below 1e-3."""
    whole = target.predict(x)
    single = np.concatenate([target.predict(x[i:i + 1]) for i in range(min(len(x), 2))])
    diff = float(np.abs(whole[:len(single)] - single).max())
    if not np.isfinite(whole).all() or not diff < 1e-3:
        raise Edge3dfaError(f"the lowered {what} gives different params for the same crop at batch 1 and batch "
                            f"{len(x)} (max diff {diff:.3g}): dynamic batch lowering failed")
    return diff


# ------------------------------------------------------------------------------------------------- int8
def layer_names(program: Any) -> list[str]:
    """Module paths of the weighted layers (conv, linear) of an exported program, in execution order."""
    names: list[str] = []
    for node in program.graph.nodes:
        op = getattr(node.target, "__name__", "").split(".")[0]
        if node.op == "call_function" and op in ("conv2d", "convolution", "linear"):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            path = stack[-1][0].removeprefix("L['self'].") if stack else node.name
            if path not in names:
                names.append(path)
    return names


def _quantizer(options: ExecuTorchOptions, float_layers: list[str], float_nodes: frozenset[str] = frozenset()) -> Any:
    """ExecuTorch's XNNPACK quantizer: int8 symmetric, per-channel weights, the ``float_layers`` and the graph
    nodes named in ``float_nodes`` left out."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    config = get_symmetric_quantization_config(is_per_channel=options.per_channel)
    if options.observer == "minmax":  # the default is a HistogramObserver (L2-optimal range search)
        act = dataclasses.replace(config.input_activation,
                                  observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    q = XNNPACKQuantizer().set_global(config)
    if float_layers or float_nodes:
        filters = [get_module_name_filter(name) for name in float_layers]
        q.set_filter_function(lambda node: node.name not in float_nodes and not any(f(node) for f in filters))
    return q


def _is_call(node: Any, *names: str) -> bool:
    return getattr(node, "op", None) == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in names


def hard_swish_nodes(graph: Any) -> frozenset[str]:
    """Names of the add, clamp, mul and div nodes of every hard-swish written out as ``x * relu6(x + 3) / 6``
    (or ``x * (relu6(x + 3) / 6)``), as upstream 3DDFA_V2's MobileNet-V3 does, in an exported graph. (A
    ``relu6(x + 3) / 6`` gate that multiplies another tensor, hard-sigmoid, is not one; ``nn.Hardswish`` exports
    as one ``hardswish`` op, which the XNNPACK quantizer leaves float anyway.)"""
    names: set[str] = set()
    for clamp in graph.graph.nodes:
        if not (_is_call(clamp, "clamp", "hardtanh") and list(clamp.args[1:3]) == [0, 6]) and \
                not _is_call(clamp, "relu6"):
            continue
        add = clamp.args[0]
        if not (_is_call(add, "add") and len(add.args) == 2 and add.args[1] == 3):
            continue
        x = add.args[0]
        for user in clamp.users:
            scaled = user if _is_call(user, "div") and user.args[1] == 6 else None
            muls = list(scaled.users) if scaled is not None else [user]
            for mul in muls:
                if not (_is_call(mul, "mul") and x in mul.args):
                    continue
                div = [] if scaled is not None else [d for d in mul.users if _is_call(d, "div") and d.args[1] == 6]
                if scaled is not None or div:
                    names.update(n.name for n in (add, clamp, mul, *div, *([scaled] if scaled is not None else [])))
    return frozenset(names)


def _graph_params(graph: Any, crops: np.ndarray, step: int) -> np.ndarray:
    """``graph``'s params on ``crops``, ``step`` crops per call, in PyTorch (no grad)."""
    import torch

    with torch.no_grad():
        return np.concatenate([graph(torch.from_numpy(np.ascontiguousarray(crops[i:i + step]))).numpy()
                               for i in range(0, len(crops), step)])


def _producer(graph: Any) -> Any:
    """The weighted node (linear, conv) whose output is the graph's output, through quantize / dequantize; None if
    the output is made otherwise or that node has no bias."""
    out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    while _is_call(node, "quantize_per_tensor", "dequantize_per_tensor"):
        node = node.args[0]
    ok = _is_call(node, "linear", "conv2d") and len(node.args) > 2 and getattr(node.args[2], "op", "") == "get_attr"
    return node if ok else None


def output_bias(graph: Any) -> Any:
    """The bias tensor of the weighted layer ``graph``'s params come straight from, or None (no such layer)."""
    import operator

    node = _producer(graph)
    return None if node is None else operator.attrgetter(node.args[2].target)(graph)


def correct_output_bias(graph: Any, crops: np.ndarray, reference: np.ndarray, step: int) -> np.ndarray | None:
    """Subtract from the params layer's bias the mean difference between ``graph``'s params (PT2E-converted, int8
    simulated by quantize / dequantize) and the float model's ``reference`` params on the same ``crops``: int8
    shifts some params by a steady amount (the same on held-out crops as on the calibration crops), which the
    params layer's bias can take back. Returns the shift removed (62 params), or None when the output does not
    come straight from a weighted layer with a bias (then nothing changes)."""
    import torch

    bias = output_bias(graph)
    if bias is None:
        return None
    with torch.no_grad():
        shift = (_graph_params(graph, crops, step).astype(np.float64) - reference).mean(axis=0)
        bias -= torch.from_numpy(shift).to(bias.dtype)
    return shift


def _observer_nodes(gm: Any) -> list[tuple[Any, tuple[str, str]]]:
    """(observer node, (observed node name, observer class)) for every observer of a prepared graph."""
    from torchao.quantization.pt2e import ObserverBase

    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ObserverBase):
            out.append((node, (node.args[0].name, type(gm.get_submodule(node.target)).__name__)))
    return out


class Int8Builder(BaseInt8Builder):
    """The exported graph, calibrated once, quantized to int8 and lowered as often as asked with different
    ``layers`` kept float (the mixed-precision search builds dozens of variants)."""

    def __init__(self, source: Checkpoint, options: ExecuTorchOptions, calibration: CalibrationSet | np.ndarray,
                 work: Path | None = None) -> None:
        if calibration is None:
            raise Edge3dfaError("executorch int8 needs a calibration set")
        _frameworks()
        self.options = options
        t0 = time.perf_counter()
        program = exported(source.load(), options.max_batch)
        names = layer_names(program)
        self.graph = program.module()
        unknown = [n for n in options.exclude if n not in names]
        if unknown:
            raise Edge3dfaError(f"exclude: no layer {unknown[0]!r} in the model; layers: {', '.join(names[:4])}, ...")
        first, last = names[0], names[-1]
        self.always_float = [n for n in names if n in options.exclude or (n == first and options.float_input)
                             or (n == last and options.float_output)]
        self.layers = {n: [n] for n in names if n not in self.always_float}
        self.float_nodes = hard_swish_nodes(self.graph) if options.hard_swish == "float" else frozenset()
        self.crops = crops_of(calibration)
        self.calibration = calibration
        self._held: Any = None  # the held-out crops (_heldout), loaded when bias_correction=auto asks
        self._reference: np.ndarray | None = None  # the float model's params on the crops (_float_params)
        self.output_shift: float | None = None  # RMS of what correct_output_bias removed in the last quantized()
        self.bias_judge: dict[str, Any] | None = None  # bias_correction=auto: the held-out NMEs it was decided on
        full = self._prepared([])
        self._calibrate(full)
        self.observers: dict[tuple[str, str], Any] = {}
        for node, key in _observer_nodes(full):
            self.observers.setdefault(key, full.get_submodule(node.target))
        self.seconds = time.perf_counter() - t0

    def _prepared(self, float_layers: list[str]) -> Any:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        from edge3dfa.targets.executorch import quiet_imports

        with quiet_imports():
            quantizer = _quantizer(self.options, [*self.always_float, *float_layers], self.float_nodes)
            return prepare_pt2e(copy.deepcopy(self.graph), quantizer)

    def _calibrate(self, prepared: Any) -> None:
        import torch

        step = self.options.max_batch
        with torch.no_grad():
            for i in range(0, len(self.crops), step):
                prepared(torch.from_numpy(np.ascontiguousarray(self.crops[i:i + step])))

    def _reuse_calibration(self, prepared: Any) -> bool:
        """Give ``prepared`` the calibrated observers of the same tensors; False when one has no counterpart."""
        nodes = _observer_nodes(prepared)
        if any(key not in self.observers for _, key in nodes):
            return False
        for node, key in nodes:
            setattr(prepared, node.target, copy.deepcopy(self.observers[key]))
        return True

    def quantized(self, keep_float: Sequence[str] = ()) -> Any:
        """The PT2E-converted graph (quantize/dequantize around int8 ops) with ``keep_float`` layers float."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from edge3dfa.targets.executorch import quiet_imports

        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the graph; e.g. {', '.join(list(self.layers)[:3])}")
        prepared = self._prepared(list(keep_float))
        if not self._reuse_calibration(prepared):
            self._calibrate(prepared)
        with quiet_imports():
            graph = convert_pt2e(prepared)
        self.output_shift, self.bias_judge = None, None
        if self.options.bias_correction == "off":
            return graph
        bias = output_bias(graph)
        if bias is None:  # the params do not come straight from a biased layer: nothing to correct or judge
            return graph
        judged = self.options.bias_correction == "auto"
        before, saved = (self._heldout_nme(graph), bias.detach().clone()) if judged else (None, None)
        shift = correct_output_bias(graph, self.crops, self._float_params(), self.options.max_batch)
        if judged:
            after = self._heldout_nme(graph)
            self.bias_judge = {"heldout_balanced_nme": {"uncorrected": before, "corrected": after},
                               "heldout_faces": len(self._heldout().inputs), "kept": after < before}
            if not after < before:  # the correction does not pay on this model: the saved bias back, bit for bit
                bias.data.copy_(saved)
                shift = None
        self.output_shift = None if shift is None else float(np.sqrt((shift ** 2).mean()))
        return graph

    def _heldout(self) -> Any:
        """The pool crops calibration does not use, with ground truth (``datasets.heldout``), loaded once."""
        from edge3dfa.datasets.heldout import heldout_for

        if self._held is None:
            self._held = heldout_for(self.calibration)
        return self._held

    def _heldout_nme(self, graph: Any) -> float:
        """Balanced NME (AFLW 21 points) of the simulated-int8 ``graph`` on the held-out crops."""
        from edge3dfa import runtime
        from edge3dfa.measure import metrics

        held = self._heldout()
        params = _graph_params(graph, held.inputs, self.options.max_batch)
        faces = metrics.nme_aflw21(runtime.landmarks(params, held.roi_boxes), held.gt)
        return float(metrics.summarize(faces, held.yaw)["balanced"])

    def _float_params(self) -> np.ndarray:
        """The float model's params on the calibration crops (computed once)."""
        if self._reference is None:
            self._reference = _graph_params(self.graph, self.crops, self.options.max_batch).astype(np.float64)
        return self._reference

    def export(self, dest: str | os.PathLike, keep_float: Sequence[str] = ()) -> dict[str, Any]:
        """Write ``dest`` with ``keep_float`` layers float; returns its manifest fields."""
        t0 = time.perf_counter()
        content, coverage = lower(exported(self.quantized(keep_float), self.options.max_batch))
        fields = _write(content, Path(dest), "int8", self.options, coverage,
                        self.seconds + time.perf_counter() - t0)
        fields["options"].update(always_float=list(self.always_float), float_layers=list(keep_float),
                                 hard_swish_float_ops=len(self.float_nodes))
        if self.options.bias_correction != "off":
            fields["options"].update(output_bias_shift_rms=self.output_shift, bias_correction_judge=self.bias_judge)
            fields["notes"].append(_bias_note(self.output_shift, self.bias_judge))
        return fields


def _bias_note(shift: float | None, judge: dict[str, Any] | None) -> str:
    if judge is not None:
        nme = judge["heldout_balanced_nme"]
        said = (f"held-out balanced NME {nme['corrected']:.4f} corrected, {nme['uncorrected']:.4f} not, on "
                f"{judge['heldout_faces']} faces (simulated int8)")
        return (f"int8: params layer's bias corrected by int8's mean params error on the calibration crops ({said})"
                if judge["kept"] else f"int8: bias correction left out: it did not lower the {said}")
    if shift is None:
        return "int8: bias correction found no params layer with a bias at the output: not applied"
    return "int8: params layer's bias corrected by int8's mean params error on the calibration crops"


# ------------------------------------------------------------------------------------------------ write
def write_float(model: Any, dest: Path, precision: str, options: ExecuTorchOptions) -> dict[str, Any]:
    """fp32 or fp16 ``model`` lowered to ``dest`` (.pte); returns the manifest fields."""
    _frameworks()
    t0 = time.perf_counter()
    net = _half(model) if precision == "fp16" else model
    content, coverage = lower(exported(net, options.max_batch))
    return _write(content, Path(dest), precision, options, coverage, time.perf_counter() - t0)


def _write(content: bytes, dest: Path, precision: str, options: ExecuTorchOptions, coverage: dict[str, Any],
           seconds: float) -> dict[str, Any]:
    """Write ``dest``, check it runs at batch 1 and max_batch, and return the manifest fields."""
    from importlib.metadata import version

    dest.write_bytes(content)
    batch = options.max_batch
    batch_diff = _self_check(dest, batch)
    fallback = ", ".join(f"{k} {v}" for k, v in coverage["cpu_fallback"].items()) or "none"
    notes = [f"XNNPACK delegate: {sum(coverage['delegated'].values())} ops in {coverage['delegated_subgraphs']} "
             f"subgraph(s); on ExecuTorch's portable CPU kernels: {fallback}",
             f"batch: any N (dynamic up to {batch} per call, larger batches in chunks; batch 1 vs batch "
             f"{batch} max diff {batch_diff:.2g})" if batch > 1 else
             "batch: static 1 (the target runs larger batches crop by crop)",
             "threads: XNNPACK uses ExecuTorch's process-wide pool; set it (Target threads=) or it takes every core",
             f"converted in {seconds:.1f} s"]
    used: dict[str, Any] = {"max_batch": batch, "route": "torch.export + to_edge_transform_and_lower "
                            "(XnnpackPartitioner)" + (" after PT2E prepare/convert" if precision == "int8" else ""),
                            "delegation": coverage}
    if precision == "int8":
        used.update(quantizer="XNNPACKQuantizer (symmetric int8)", per_channel=options.per_channel,
                    observer=options.observer, float_input=options.float_input, float_output=options.float_output,
                    exclude=list(options.exclude), hard_swish=options.hard_swish,
                    bias_correction=options.bias_correction)
        notes.append("int8: static PT2E quantization (int8 activations and weights), layers in always_float and "
                     "float_layers run in fp32 inside the same XNNPACK delegate")
    if precision == "fp16":
        notes.append("fp16: computes in half precision (XNNPACK f16 kernels; float32 input and output cast at the "
                     "edges), not just fp16 storage: compare its parity with TFLite's fp16 (weights only)")
    runtime = version("executorch")
    notes.append(f"ExecuTorch runtime compatibility (runtime/COMPATIBILITY.md): a .pte runs on the release that wrote "
                 f"it ({runtime}) and at least the next minor release; older runtimes are not guaranteed")
    return {"options": used, "input": dict(CANONICAL_INPUT), "output": dict(CANONICAL_OUTPUT), "notes": notes,
            "min_runtime": {"executorch": runtime}, "tools": tool_versions("torch", "executorch", "torchao")}


# ---------------------------------------------------------------------------------------------- bundles
#: the constant methods a bundle program answers besides ``forward`` (ExecuTorch "config methods": a method with no
#: input returning a string, read on the phone with ``Module::execute("contract")``); the .pte has no tensor names,
#: so the method names, ``output_names`` and the contract JSON are the names
BUNDLE_METHODS = ("contract", "input_name", "output_names", "edge3dfa_version", "model", "precision",
                  "source_sha256")


def bundle_constants(source: Checkpoint, precision: str) -> dict[str, str]:
    """The bundle program's constant methods (``BUNDLE_METHODS``): the contract JSON (equal to the manifest's
    ``bundle`` field), the input name, the output names in ``forward``'s order, and where the file came from."""
    import json

    from edge3dfa import __version__, bundle

    return {"contract": json.dumps(bundle_contract(source), sort_keys=True), "input_name": bundle.INPUT_NAME,
            "output_names": ",".join(bundle.OUTPUTS), "edge3dfa_version": __version__, "model": source.name,
            "precision": precision, "source_sha256": source.sha256}


def bundle_contract(source: Checkpoint) -> dict[str, Any]:
    """The contract of ``source``'s regressor bundle (uint8 NHWC, the channel order chosen at conversion)."""
    from edge3dfa import bundle

    return bundle.regressor_contract(source.bundle.channels, "NHWC")


def exported_bundle(module: Any, max_batch: int) -> Any:
    """``torch.export`` of a bundle module (eval mode already: a PT2E-converted net inside refuses ``eval()``) on
    uint8 [B,120,120,3] images, the batch dynamic up to ``max_batch`` (the example is the maximum, as ``_example``)."""
    import torch
    from torch.export import Dim, export

    x = (torch.zeros(max_batch, 120, 120, 3, dtype=torch.uint8),)
    dynamic = None if max_batch == 1 else ({0: Dim("batch", min=1, max=max_batch)},)
    try:
        return export(module, x, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - export raises many types; one line for the user
        raise Edge3dfaError(f"torch.export could not capture the bundle: {one_line(e)}") from e


def lower_bundle(program: Any, constants: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
    """``lower`` with the bundle's constant methods: .pte bytes and what the XNNPACK delegate took."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    from edge3dfa.targets.executorch import native_log, quiet_imports

    with quiet_imports(), native_log():
        edge = to_edge_transform_and_lower({"forward": program}, partitioner=[XnnpackPartitioner()],
                                           constant_methods=dict(constants))
        info = get_delegation_info(edge.exported_program("forward").graph_module)
        buffer = edge.to_executorch().buffer
    return bytes(buffer), _coverage(info)


def bundle_calibration(calibration: CalibrationSet | np.ndarray) -> CalibrationSet | np.ndarray:
    """The calibration crops as the network sees them inside the bundle: each crop made a uint8 image
    (``bundle.to_image_uint8``, exact or an error) and normalised back as the bundle's pre-processing does
    (``(x - 127.5) / 128`` is exact in float32), so the observers see the values the phone's images give. A
    ``CalibrationSet`` stays one (same folder and files), so ``bias_correction=auto`` judges on the pool crops it
    leaves, as for the params artifact, not on the default held-out crops that a large calibration may overlap."""
    import dataclasses

    from edge3dfa import bundle

    try:
        data = bundle.from_image_uint8(bundle.to_image_uint8(crops_of(calibration)))
        return dataclasses.replace(calibration, data=data) if hasattr(calibration, "files") else data
    except Edge3dfaError:
        raise Edge3dfaError("a bundle is calibrated on uint8 images: the calibration crops must be normalised "
                            "uint8 crops ((pixel - 127.5) / 128), as edge3dfa's calibration loader makes") from None


def write_bundle(source: Checkpoint, dest: Path, precision: str, options: ExecuTorchOptions,
                 calibration: CalibrationSet | None) -> dict[str, Any]:
    """A regressor bundle (``Checkpoint.bundle_module("NHWC")``) lowered to ``dest``; returns the manifest fields.
    int8 quantizes the network alone, as the params artifact does (``Int8Builder``: the same float layers and
    ranges), calibrated on ``bundle_calibration``; the pre-processing and the head stay float32."""
    _frameworks()
    t0 = time.perf_counter()
    module, used = source.bundle_module("NHWC"), {}
    if precision == "int8":
        if calibration is None:
            raise Edge3dfaError("executorch int8 needs a calibration set")
        builder = Int8Builder(source, options, bundle_calibration(calibration))
        module.net = builder.quantized()  # set after the module's eval(): the converted graph refuses eval()
        used = {"quantizer": "XNNPACKQuantizer (symmetric int8), the network only", "per_channel": options.per_channel,
                "observer": options.observer, "float_input": options.float_input,
                "float_output": options.float_output, "exclude": list(options.exclude),
                "always_float": list(builder.always_float), "hard_swish": options.hard_swish,
                "bias_correction": options.bias_correction}
        if options.bias_correction != "off":
            used.update(output_bias_shift_rms=builder.output_shift, bias_correction_judge=builder.bias_judge)
    content, coverage = lower_bundle(exported_bundle(module, options.max_batch), bundle_constants(source, precision))
    dest.write_bytes(content)
    batch_diff = _self_check_bundle(dest, options.max_batch)
    return bundle_fields(source, precision, options, coverage, used, batch_diff, time.perf_counter() - t0)


def _self_check_bundle(path: Path, max_batch: int) -> float:
    """``_self_check`` for a bundle: random uint8 crops at ``max_batch`` and one at a time give the same params
    (normalised back); the program's constant methods give the contract. Returns the max abs difference."""
    from edge3dfa import bundle
    from edge3dfa.targets.executorch import ExecuTorchTarget

    target = ExecuTorchTarget(path, threads=1)
    if target.bundle is None or target.capacity != max_batch:
        raise Edge3dfaError(f"the lowered bundle has no contract method or holds batches of {target.capacity}, "
                            f"not max_batch={max_batch}")
    images = np.random.default_rng(0).integers(0, 256, (max_batch, 120, 120, 3), dtype=np.uint8)
    return _batch_diff(target, bundle.from_image_uint8(images), "bundle")


def bundle_fields(source: Checkpoint, precision: str, options: ExecuTorchOptions, coverage: dict[str, Any],
                  used: dict[str, Any], batch_diff: float, seconds: float) -> dict[str, Any]:
    """The manifest fields of an ExecuTorch regressor bundle."""
    from importlib.metadata import version

    from edge3dfa import bundle

    contract, batch = bundle_contract(source), options.max_batch
    fallback = ", ".join(f"{k} {v}" for k, v in coverage["cpu_fallback"].items()) or "none"
    notes = ["phone bundle: uint8 image in, landmarks/pose/params out (edge3dfa.bundle); method 'forward' takes "
             f"the image and returns ({', '.join(bundle.OUTPUTS)}) in that order (a .pte has no tensor names)",
             f"the program's constant methods {', '.join(BUNDLE_METHODS)} return strings: 'contract' is this "
             "manifest's 'bundle' field as JSON",
             f"XNNPACK delegate: {sum(coverage['delegated'].values())} ops in {coverage['delegated_subgraphs']} "
             f"subgraph(s); on ExecuTorch's portable CPU kernels: {fallback}",
             f"batch: any N (dynamic up to {batch} per call, larger batches in chunks; batch 1 vs batch {batch} max "
             f"diff {batch_diff:.2g})" if batch > 1 else "batch: static 1 (the target runs larger batches crop by "
                                                         "crop)",
             f"converted in {seconds:.1f} s"]
    if precision == "int8":
        notes.append("int8: the network is statically quantized (PT2E, as the params artifact: always_float layers "
                     "fp32); the uint8 -> float pre-processing and the landmark/pose head run in float32")
        if "bias_correction_judge" in used:
            notes.append(_bias_note(used["output_bias_shift_rms"], used["bias_correction_judge"]))
    runtime = version("executorch")
    return {"options": {"max_batch": batch, "bundle": source.bundle.to_dict(), "delegation": coverage,
                        "route": "torch.export + to_edge_transform_and_lower (XnnpackPartitioner, constant methods)"
                                 + (" after PT2E prepare/convert of the network" if precision == "int8" else ""),
                        **used},
            "input": contract["input"], "output": {"name": ", ".join(bundle.OUTPUTS), **contract["outputs"]},
            "bundle": contract, "notes": notes, "min_runtime": {"executorch": runtime},
            "tools": tool_versions("torch", "executorch", "torchao")}


# ------------------------------------------------------------------------------------------ the format
class ExecuTorchFormat(Format):
    name = "executorch"
    suffix = ".pte"
    extra = "executorch"
    precisions = ("fp32", "fp16", "int8")
    #: fp16 is opt-in: its file is barely smaller than fp32's (module docstring)
    default_precisions = ("fp32", "int8")
    Options = ExecuTorchOptions
    int8_candidates = INT8_CANDIDATES

    def check(self, precision: str, detector: bool, options: ExecuTorchOptions) -> None:
        """The regressors only; the float precisions take max_batch alone (int8's options set for them: an error)."""
        super().check(precision, detector, options)
        if detector:
            raise Edge3dfaError("the executorch converter takes the 3DDFA regressors; convert FaceBoxes to onnx or "
                                "tflite")
        int8_only = sorted(options.explicit - {"max_batch"})
        if precision not in self.calibrated and int8_only:
            raise Edge3dfaError(f"executorch option(s) {', '.join(int8_only)} apply to int8 only, not {precision}")

    def write(self, source: Checkpoint, dest: Path, precision: str, options: ExecuTorchOptions,
              calibration: CalibrationSet | None) -> dict[str, Any]:
        self.check(precision, source.is_detector, options)
        if source.bundle is not None:
            return write_bundle(source, dest, precision, options, calibration)
        if precision in self.calibrated:
            return Int8Builder(source, options, calibration).export(dest)
        return write_float(source.load(), dest, precision, options)

    def int8_builder(self, source: Checkpoint, options: ExecuTorchOptions, calibration: CalibrationSet,
                     work: Path) -> Int8Builder:
        return Int8Builder(source, options, calibration, work)

    #: phone bundles (``write_bundle``): the regressors at fp32 and int8
    bundles = True

    def check_bundle(self, precision: str, detector: bool, options: ExecuTorchOptions) -> None:
        if detector or precision not in ("fp32", "int8"):
            raise Edge3dfaError("executorch bundles are built for the 3DDFA regressors at fp32 and int8 (FaceBoxes "
                                "does not export to executorch; fp16 is not bundled)")
