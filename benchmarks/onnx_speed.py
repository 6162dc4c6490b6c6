"""onnxruntime fp32 / int8 / dyn-int8 vs PyTorch eager, and vs the third-party StableView export (printed).

Every figure is the median of round medians, the rounds taken round-robin in this one process, so ratios compare
like with like: batch 1 and 64, 1 thread and all threads. StableView's export has a fixed batch of 1, so its batch-64
figure is 64 single runs (what a user of that file gets). Conversions go to a temp folder.
Usage: python benchmarks/onnx_speed.py [--model mb05] [--repeats 200] [--calib-count 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable


def median_times(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each function: the median of ``rounds`` round medians of ``repeats // rounds``
    calls each, taken round-robin, so load from other users of a shared machine hits every runtime alike instead
    of one of them."""
    from edge3dfa.measure.timing import time_calls

    for fn in fns.values():
        for _ in range(3):
            fn()
    medians: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(time_calls(fn, 0, per_round)["median_ms"] / 1e3)
    return {k: statistics.median(v) for k, v in medians.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mb05")
    ap.add_argument("--repeats", type=int, default=200, help="runs per batch-1 figure (batch 64: a tenth)")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,int8,dyn-int8")
    args = ap.parse_args()

    import torch

    from edge3dfa import assets
    from edge3dfa.converters import convert
    from edge3dfa.datasets.calibration import load_eval_crops
    from edge3dfa.targets.onnxruntime import OnnxTarget
    from edge3dfa.targets.torch import TorchTarget

    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        arts = convert(args.model, to="onnx", precision=precisions, out_dir=tmp,
                       calibration={"count": args.calib_count}, verbose=False)
        paths = {a.manifest.precision: a.path for a in arts}
        if args.model == "mb05":
            paths["stableview fp32"] = assets.fetch("stableview_mb05_onnx")
        x64 = load_eval_crops(64)
        all_threads = os.cpu_count() or 1
        print(f"model {args.model}, {all_threads} CPUs, torch {torch.__version__}; median ms per call "
              f"(ratio = torch time / this time, > 1 is faster than PyTorch)")
        print(f"{'runtime':26s} {'threads':>7s} {'batch':>5s} {'ms/call':>9s} {'ms/face':>8s} {'vs torch':>8s}")
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            ref = TorchTarget(args.model, threads=threads)
            targets = {name: OnnxTarget(p, threads=threads) for name, p in paths.items()}
            for n in (1, 64):
                x = x64[:n]
                fns = {"torch eager": lambda x=x, ref=ref: ref.predict(x)}
                fns.update({f"onnxruntime {k}": (lambda x=x, t=t: t.predict(x)) for k, t in targets.items()})
                times = median_times(fns, args.repeats if n == 1 else max(10, args.repeats // 10))
                for name, t in times.items():
                    print(f"{name:26s} {threads:7d} {n:5d} {t * 1e3:9.2f} {t / n * 1e3:8.3f} "
                          f"{times['torch eager'] / t:8.2f}", flush=True)
                if "stableview fp32" in targets:
                    ratio = times["onnxruntime stableview fp32"] / times["onnxruntime fp32"]
                    print(f"{'  ours fp32 vs stableview':26s} {threads:7d} {n:5d} {'':9s} {'':8s} {ratio:8.2f} "
                          "(> 1: ours faster)")


if __name__ == "__main__":
    main()
