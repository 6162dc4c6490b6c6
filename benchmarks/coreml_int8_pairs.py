"""Where a CoreML int8 program loses accuracy: its quantize/dequantize pairs bypassed one class at a time.

Builds the int8 artifact of a model with the defaults (or ``--option activations=symmetric`` etc.), then, for each
class of pairs, rewires the readers of those pairs' dequantize to the tensor before the quantize (that class kept
float, the rest as built) and prints the RMS departure of the 62 normalised params from PyTorch's and the held-out
ΔNME (AFLW 21 points, the crops ``--nme-budget`` judges on). Classes, by the quantized tensor: ``input`` (the
image), ``preact`` (a conv / linear output read by ``x + 3``, i.e. hard-swish or hard-sigmoid inputs), ``vector``
(1x1 spatial or rank 2: squeeze-excite and the head), ``residual`` (an add of two tensors, or read by one), and the
rest by the op that made it (``after_relu``, ``after_mul``: hard-swish or squeeze-excite products, ``after_conv``).
Numbers in README "CoreML int8" (issue 20). Usage:

    python benchmarks/coreml_int8_pairs.py --checkpoint PATH|--model mb05 [--option activations=symmetric] [--count 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge3dfa import runtime
from edge3dfa.converters import get_format
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import load_heldout
from edge3dfa.measure import metrics
from edge3dfa.measure.predict import predict_all
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.targets.mil_eval import MILEvaluator, blas_threads, load_program
from edge3dfa.targets.torch import TorchTarget

CLASSES = ("none", "input", "preact", "vector", "residual", "after_relu", "after_mul", "after_conv")


def _const(v) -> bool:  # noqa: ANN001
    return v.op is not None and v.op.op_type == "const"


def pair_class(dequantize) -> str:  # noqa: ANN001
    tensor = dequantize.inputs["input"].op.inputs["input"]
    maker = tensor.op.op_type if tensor.op is not None else "input"
    readers = dequantize.outputs[0].child_ops
    shape = tuple(tensor.shape)
    if maker in ("input", "cast"):
        return "input"
    if maker in ("conv", "linear") and any(r.op_type == "add" and _const(r.inputs["y"]) for r in readers):
        return "preact"
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        return "vector"
    if maker == "add" or any(r.op_type == "add" and not _const(r.inputs["y"]) for r in readers):
        return "residual"
    return f"after_{maker}"


def bypassed(path: Path, cls: str) -> tuple[MILEvaluator, int]:
    """The program at ``path`` with the pairs of class ``cls`` bypassed, and how many."""
    prog = load_program(path)
    main = prog.functions["main"]
    pairs = [op for op in main.operations if op.op_type == "dequantize" and op.inputs["input"].op is not None
             and op.inputs["input"].op.op_type == "quantize" and pair_class(op) == cls]
    for d in pairs:
        before = d.inputs["input"].op.inputs["input"]
        main.replace_uses_of_var_after_op(anchor_op=d, old_var=d.outputs[0], new_var=before,
                                          no_check_var_types=True, force_replace=True)
    return MILEvaluator(prog), len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--model")
    ap.add_argument("--option", action="append", default=[], help="coreml option KEY=VALUE (repeatable)")
    ap.add_argument("--count", type=int, default=128, help="held-out crops scored (the last COUNT)")
    args = ap.parse_args()
    source = Checkpoint.open(args.checkpoint or args.model)
    fmt = get_format("coreml")
    options = fmt.Options.parse(dict(o.split("=", 1) for o in args.option))
    held = load_heldout(args.count)
    ref = predict_all(TorchTarget(source.path, threads=1, model=source.load()), held.inputs)

    def errors(params: np.ndarray) -> np.ndarray:
        return metrics.nme_aflw21(runtime.landmarks(params, held.roi_boxes), held.gt)

    ref_summary = metrics.summarize(errors(ref), held.yaw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.mlpackage"
        fmt.int8_builder(source, options, load_calibration(None, count=256), Path(tmp)).export(path)
        print(f"| pairs bypassed (kept float) | count | departure (RMS, normalised params) | held-out Δ balanced "
              f"({args.count} crops) |\n|---|---|---|---|")
        for cls in CLASSES:
            ev, n = bypassed(path, "" if cls == "none" else cls)
            name = next(iter(ev.input_vars))
            with blas_threads(1):
                got = np.concatenate([ev({name: x[None]})[ev.output_names[0]] for x in held.inputs])
            got = got.astype(np.float32)
            d = metrics.delta(metrics.summarize(errors(got), held.yaw), ref_summary)
            print(f"| {cls} | {n} | {np.sqrt(((got - ref) ** 2).mean()):.4f} | {d['balanced']:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
