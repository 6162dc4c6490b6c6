"""CoreML ``int8``: int8 activations (quantize/dequantize pairs, iOS17) and int8 weights, built by ``Int8Builder``.

coremltools calibrates activations with CoreML ``predict`` (macOS only); here the ranges come from running the
program in the numpy MIL evaluator over the calibration crops, so it converts on Linux too. Defaults (the
``CoreMLOptions`` fields), each measured on mb05 (README "Int8 within an NME budget"): the params layer stays
float (``float_output``, as ONNX and TFLite keep it): its 8-bit output tensor was nearly all of int8's error;
the first conv is int8 (``float_input=false``; ONNX keeps it float for onnxruntime's x86 kernels, but here
keeping it float helped mb05 and hurt MobileNet-V3 by about as much, so it is left to the search); ranges are
min / max clipped to the 99.999th percentile of |x| (plain min / max and the 99.99th percentile did worse on the
held-out AFLW crops, on which every default was chosen); activations are asymmetric (``activations``: a zero point
per tensor, as ONNX and TFLite int8 have): coremltools' default, symmetric, spends half of the 256 codes on
negative values that a ReLU or hard-swish output (>= -0.375) never takes, which cost the MobileNet-V3-large
fixture most of its int8 error (README "CoreML int8"). ``--nme-budget`` searches more float layers
(``workflows.budget``).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np

from edge3dfa.converters.base import Int8Builder as BaseInt8Builder
from edge3dfa.converters.coreml.compression import compress, w8_info, weight_notes
from edge3dfa.converters.coreml.export import at_least, convert_program, resolve, save
from edge3dfa.datasets.calibration import crops_of
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line
from edge3dfa.targets.mil_eval import MILEvaluator, blas_threads, import_coremltools, program_of, quiet_coremltools

if TYPE_CHECKING:
    from edge3dfa.converters.coreml import CoreMLOptions
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

CALIB_MAX = 256
RANGE_BINS = 2048


def module_order(model: Any) -> list[tuple[str, tuple[int, ...]]]:
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
    paths, as TFLite names them) when ``modules`` (``module_order``) lines up with the program's weighted ops
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
    filled in a second pass; both ends are clipped at that |x| (a symmetric scale reads only the larger)."""
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


#: CoreMLOptions.activations -> coremltools' OpLinearQuantizerConfig mode
ACTIVATION_MODES = {"asymmetric": "linear", "symmetric": "linear_symmetric"}


def _quantize_activations(mlmodel: Any, ranges: dict[str, dict[str, float]], keep: Iterable[str] = (),
                          activations: str = "asymmetric") -> Any:
    """int8 step 1: quantize/dequantize pairs placed by coremltools with the measured ``ranges``; ops named in
    ``keep`` get none (coremltools puts the pairs on the inputs and outputs of conv, linear, pools and add).
    ``activations`` (``ACTIVATION_MODES``): ``asymmetric`` maps each tensor's rmin..rmax onto the 256 int8 codes
    (a zero point per tensor), ``symmetric`` maps -max|x|..max|x| onto 255 (zero point 0)."""
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
        mode=ACTIVATION_MODES[activations], dtype="int8"), op_name_configs=dict.fromkeys(keep))
    try:  # the ranges are given, so coremltools' calibration sample is only checked for its input name
        with _evaluator_calibration(stats_fn), quiet_coremltools():
            return cto.coreml.linear_quantize_activations(mlmodel, config, [{name: np.zeros((1, 3, 120, 120))}])
    except Edge3dfaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise Edge3dfaError(f"coremltools activation quantization failed: {one_line(e)}") from None


def _unquantized(var: Any) -> Any:
    """The tensor before a quantize/dequantize pair, if ``var`` is the output of one; else ``var``."""
    op = var.op
    if op is None or op.op_type != "dequantize":
        return var
    q = op.inputs["input"].op
    return q.inputs["input"] if q is not None and q.op_type == "quantize" else var


def _float_readers(mlmodel: Any, keep: Iterable[str]) -> Any:
    """int8 step 2: the ops named in ``keep`` read float tensors. coremltools gives an int8 layer a
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
    ios17 = import_coremltools()._SPECIFICATION_VERSION_IOS_17  # noqa: SLF001
    with quiet_coremltools():
        return _apply_graph_pass(mlmodel, passes, spec_version=ios17, pymil_load_func=milproto.load,
                                 skip_model_load=True)



class Int8Builder(BaseInt8Builder):
    """The float ML program, converted and calibrated once, quantized to int8 as often as asked with different
    ``layers`` kept float (the --nme-budget search builds dozens of variants; the evaluator passes over the
    calibration crops are the slow part, so they run once).

    A layer is a weighted op (conv, linear) with the ops after it up to the next one (``layer_units``). Layers
    kept float (``always_float``: ``float_layers``, the params layer with ``float_output``, the first conv with
    ``float_input``; plus ``keep_float`` per export) read float tensors (no quantize/dequantize pair in front of
    them), compute in the program's float precision with float weights, and write float tensors; an int8 layer
    that reads one quantizes it at its own input.
    """

    def __init__(self, source: Checkpoint, options: CoreMLOptions, calibration: CalibrationSet,
                 work: Path | None = None) -> None:
        if calibration is None:
            raise Edge3dfaError("coreml int8 needs a calibration set (real face crops)")
        self.source, self.options = source, resolve("int8", options)
        t0 = time.perf_counter()
        self.mlmodel, self.units = self._program()
        self.always_float = self._always_float()
        self.layers = {k: v for k, v in self.units.items() if k not in self.always_float}
        crops = crops_of(calibration)[:CALIB_MAX]
        self.samples = len(crops)
        self.ranges = activation_ranges(self.mlmodel, self._program_input(crops), self.options.calib_method,
                                        self.options.percentile)
        self.seconds = time.perf_counter() - t0

    def _program(self) -> tuple[Any, dict[str, list[str]]]:
        """The float program to quantize and its candidate layers (``layer_units``, named by torch module)."""
        model = self.source.load()
        mlmodel = convert_program(model, False, self.options)
        return mlmodel, layer_units(program_of(mlmodel), module_order(model))

    def _program_input(self, crops: np.ndarray) -> np.ndarray:
        """The calibration crops as the program's input takes them (pixel values for an image input)."""
        return crops * np.float32(128) + np.float32(127.5) if self.options.input == "image" else crops

    def _always_float(self) -> list[str]:
        names, o = list(self.units), self.options
        unknown = [k for k in o.float_layers if k not in self.units]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=3) or names[:3]
            raise Edge3dfaError(f"coreml float_layers: no layer {unknown[0]!r}; e.g. {', '.join(close)}")
        keep = {*o.float_layers, *([names[-1]] if o.float_output else []), *([names[0]] if o.float_input else [])}
        return [k for k in names if k in keep]  # program order

    def _record(self, float_layers: list[str], ios18: bool) -> tuple[dict[str, Any], list[str]]:
        """The manifest's ``compression`` and notes for an int8 artifact with ``float_layers`` float."""
        o = self.options
        how = ("min/max" if o.calib_method == "minmax"
               else f"min/max clipped to the {o.percentile:g}th percentile of |x|")
        activations = {"dtype": "int8", "mode": ACTIVATION_MODES[o.activations], "granularity": "per_tensor",
                       "calibration": f"{how} over {self.samples} crops, numpy MIL evaluator",
                       "calib_method": o.calib_method, "float_output": o.float_output, "float_input": o.float_input,
                       "float_layers": float_layers}
        if o.calib_method == "percentile":
            activations["percentile"] = o.percentile
        notes = [f"activation ranges: {how} over every calibration crop, from the numpy MIL evaluator "
                 "(coremltools' own calibration runs CoreML predict, macOS only)"]
        if float_layers:
            why = [w for w, on in (("float_input: the first conv reads the full-range image", o.float_input),
                                   ("float_output: an 8-bit params tensor was most of int8's error",
                                    o.float_output)) if on]
            notes.append(f"int8: {len(float_layers)} layer(s) kept float (no quantize/dequantize pair in front, "
                         f"{o.compute} weights): {', '.join(float_layers)}"
                         + (f" ({'; '.join(why)}; README 'Int8 within an NME budget')" if why else ""))
        notes += weight_notes("int8", o.compute, ios18)
        return {"activations": activations, "weights": w8_info(ios18)}, notes

    def frame_ops(self) -> list[str]:
        """Ops outside every layer that always stay float (a bundle's pre/post-processing); none here."""
        return []

    def save(self, mlmodel: Any, dest: Path, notes: list[str], compression: dict[str, Any]) -> dict[str, Any]:
        """Describe and write the int8 program; returns its manifest fields."""
        return save(mlmodel, dest, self.source, "int8", self.options, notes, compression)

    def export(self, dest: str | os.PathLike, keep_float: Sequence[str] = ()) -> dict[str, Any]:
        """Write ``dest`` with ``keep_float`` layers float too; returns its manifest fields."""
        unknown = [k for k in keep_float if k not in self.layers]
        if unknown:
            raise Edge3dfaError(f"no layer {unknown[0]!r} in the program; e.g. {', '.join(list(self.layers)[:3])}")
        t0 = time.perf_counter()
        float_layers = [k for k in self.units if k in {*self.always_float, *keep_float}]  # program order
        ops = [n for k in float_layers for n in self.units[k]] + self.frame_ops()
        mlmodel = _quantize_activations(self.mlmodel, self.ranges, ops, self.options.activations)
        if ops:
            mlmodel = _float_readers(mlmodel, ops)
        ios18 = at_least(self.options.deployment_target, "iOS18")
        mlmodel = compress(mlmodel, "w8", ios18, ops)
        compression, notes = self._record(float_layers, ios18)
        notes.append(f"converted in {self.seconds + time.perf_counter() - t0:.1f} s")
        fields = self.save(mlmodel, Path(dest), notes, compression)
        if keep_float:
            fields["options"]["float_layers"] = list(keep_float)
        return fields
