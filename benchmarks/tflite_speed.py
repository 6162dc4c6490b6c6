"""TFLite (LiteRT + XNNPACK) latency per precision vs PyTorch eager, batch 1, 1 thread and all threads.

Printed, never asserted. Goal from the TFLite issue: int8 >= 2.5x PyTorch eager at 1 thread. Timings are
the median of ``--repeats`` calls of ``Target.predict`` (so the NHWC transpose and int8 (de)quantization
are included), after warm-up; PyTorch is measured in the same run, on the same crop.
Usage: python benchmarks/tflite_speed.py [--models mb05,mbv3_05,mbv3_large_05] [--out out/bench] [--repeats 300]
"""

from __future__ import annotations

import argparse
import os
import sys

from edge3dfa import assets
from edge3dfa.converters import convert
from edge3dfa.converters.tflite import TFLiteFormat
from edge3dfa.datasets.calibration import load_eval_crops
from edge3dfa.manifest import manifest_path
from edge3dfa.measure.timing import time_calls
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.targets.tflite import TFLiteTarget
from edge3dfa.targets.torch import TorchTarget

PRECISIONS = TFLiteFormat.precisions


def median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    return time_calls(fn, max(10, repeats // 10), repeats)["median_ms"]


#: zoo models without public weights -> the distilled test fixture that stands in (same architecture)
FIXTURES = {"mbv3_05": "mbv3_05_distilled", "mbv3_large_05": "mbv3_large_05_distilled"}


def source(name: str):  # noqa: ANN201
    return Checkpoint.open(assets.fetch(FIXTURES[name]) if name in FIXTURES else name)


def artifacts(name: str, out: str, calib_count: int) -> dict[str, str]:
    src = source(name)
    paths, missing = {}, []
    for p in PRECISIONS:
        path = os.path.join(out, src.name, "tflite", f"{src.name}_{p}.tflite")
        if os.path.exists(path) and manifest_path(path).exists():
            paths[p] = path
        else:
            missing.append(p)
    if missing:
        for a in convert(src, to="tflite", precision=missing, out_dir=out, calibration={"count": calib_count},
                         verbose=True):
            paths[a.manifest.precision] = str(a.path)
    return {"source": src, **paths}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mb05,mbv3_05")
    ap.add_argument("--out", default="out/bench", help="artifacts are converted here once, then reused")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--calib-count", type=int, default=256)
    args = ap.parse_args()
    x = load_eval_crops(1)
    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    rows = []
    for name in args.models.split(","):
        arts = artifacts(name, args.out, args.calib_count)
        src = arts.pop("source")
        for threads in thread_counts:
            reference = TorchTarget(src.path, threads=threads, model=src.load())
            torch_ms = median_ms(lambda t=reference: t.predict(x), max(50, args.repeats // 3))
            rows.append((name, "pytorch eager", threads, torch_ms, 1.0))
            for p in PRECISIONS:
                target = TFLiteTarget(arts[p], threads=threads)
                ms = median_ms(lambda t=target: t.predict(x), args.repeats)
                rows.append((name, f"tflite {p}", threads, ms, torch_ms / ms))
    print(f"{'model':10s} {'runtime':16s} {'threads':>7s} {'median ms':>10s} {'x eager':>8s}")
    for name, what, threads, ms, ratio in rows:
        print(f"{name:10s} {what:16s} {threads:7d} {ms:10.3f} {ratio:8.2f}")
    print(f"batch 1, {args.repeats} calls each; CPU: {os.cpu_count()} threads; numbers are noisy on shared machines",
          file=sys.stderr)


if __name__ == "__main__":
    main()
