"""Numpy runtime, PyTorch reference and deployment runtimes' speed on this machine (printed, never asserted).

Targets from the foundation issue: 68-pt reconstruction + transform <= 30 us per face, dense (38,365
vertices) <= 1 ms per face, one thread; PyTorch mb05 forward at batch 1 and 64, 1 thread and all threads.
Then mb05 fp32 and int8 on every installed deployment runtime (onnxruntime, LiteRT, ExecuTorch), side by side
in one run: batch 1 through ``Target.predict``, at 1 thread and at all threads, timed round-robin (``--rounds``
rounds of ``--runs`` calls, median per round, then the median and the fastest of rounds), so a change of machine
load hits every runtime alike. Artifacts are converted once into ``--out`` and reused. The load average is
printed before and after: on a shared machine, compare runtimes within one run only.
Usage: python benchmarks/runtime_speed.py [--repeats N] [--formats onnx,tflite,executorch] [--out out/bench]
       [--runtimes-only] [--rounds 7] [--runs 100]
"""

import os
import sys

# one BLAS thread for the runtime figures: set before numpy loads its BLAS
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edge3dfa import runtime  # noqa: E402
from edge3dfa.runtime.bfm import BFM, reconstruct  # noqa: E402


def timeit(fn, repeats: int) -> tuple[float, float]:
    """Median and p90 seconds of ``repeats`` calls after a few warm-up calls."""
    from edge3dfa.measure.timing import time_calls

    r = time_calls(fn, max(3, repeats // 20), repeats)
    return r["median_ms"] / 1e3, r["p90_ms"] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--formats", default="onnx,tflite,executorch", help="deployment runtimes ('' for none)")
    ap.add_argument("--out", default="out/bench", help="converted artifacts are kept here and reused")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--runtimes-only", action="store_true", help="skip the numpy and PyTorch figures")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs")
    try:
        if not args.runtimes_only:
            numpy_and_torch(args)
        if args.formats:
            deployment_runtimes(args)
    finally:
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} at the end")


def numpy_and_torch(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    base = runtime.load_bfm68()
    print(f"{'what':48s} {'median':>10s} {'p90':>10s}")
    for n in (1, 64):
        p = rng.normal(0, 1, (n, 62)).astype(np.float32)
        roi = np.tile([[10, 20, 250, 260]], (n, 1)).astype(np.float32)
        med, p90 = timeit(lambda p=p, roi=roi: runtime.landmarks(p, roi), args.repeats)
        print(f"{'68-pt recon+transform, per face, batch ' + str(n):48s} {med / n * 1e6:8.1f}us {p90 / n * 1e6:8.1f}us")
    u = np.load(__import__("edge3dfa.assets", fromlist=["fetch"]).fetch("u_dense")).reshape(-1)
    dense = BFM(u, rng.normal(0, 1e3, (50, u.size)).astype(np.float32), base.param_mean, base.param_std)
    for n in (1, 16):
        p = runtime.denormalise(rng.normal(0, 1, (n, 62)).astype(np.float32))
        roi = np.tile([[10, 20, 250, 260]], (n, 1)).astype(np.float32)
        med, p90 = timeit(lambda p=p, roi=roi: runtime.to_image(reconstruct(p, dense), roi), args.repeats // 3)
        print(f"{'dense 38,365 vertices, per face, batch ' + str(n):48s} {med / n * 1e3:8.3f}ms {p90 / n * 1e3:8.3f}ms")
    try:
        import torch
    except ImportError:
        print("torch not installed: PyTorch latency skipped", file=sys.stderr)
        return
    from edge3dfa.models import load_model

    model = load_model("mb05")
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        for n in (1, 64):
            x = torch.from_numpy(rng.normal(0, 1, (n, 3, 120, 120)).astype(np.float32))
            with torch.inference_mode():
                med, p90 = timeit(lambda x=x: model(x), args.repeats if n == 1 else args.repeats // 10)
            print(f"{f'torch mb05 forward, batch {n}, {threads} thread(s)':48s} {med * 1e3:8.2f}ms {p90 * 1e3:8.2f}ms")


#: the Python module each format needs, to skip formats that are not installed
_NEEDS = {"onnx": "onnxruntime", "tflite": "ai_edge_litert", "executorch": "executorch"}


def deployment_runtimes(args: argparse.Namespace) -> None:
    """mb05 fp32 and int8 on each installed runtime, batch 1, round-robin at 1 thread and at all threads."""
    from edge3dfa.converters import convert
    from edge3dfa.manifest import manifest_path
    from edge3dfa.measure.timing import cpu_threads, time_calls
    from edge3dfa.models.checkpoint import Checkpoint
    from edge3dfa.target import open_target

    formats = [f for f in args.formats.split(",") if importlib.util.find_spec(_NEEDS.get(f, f)) is not None]
    src = Checkpoint.open("mb05")
    paths: dict[tuple[str, str], Path] = {}
    for fmt in formats:
        suffix = {"onnx": ".onnx", "tflite": ".tflite", "executorch": ".pte"}[fmt]
        want = {p: Path(args.out) / "mb05" / fmt / f"mb05_{p}{suffix}" for p in ("fp32", "int8")}
        missing = [p for p, path in want.items() if not (path.exists() and manifest_path(path).exists())]
        if missing:
            convert(src, to=fmt, precision=missing, out_dir=args.out, verbose=True)
        paths.update({(fmt, p): path for p, path in want.items()})
    x = np.zeros((1, 3, 120, 120), np.float32)
    print(f"\nmb05, batch 1, {args.rounds} rounds x {args.runs} calls, round-robin (median of round medians; "
          "fastest round); x ONNX = ONNX fp32 time / this time")
    print("| runtime | precision | threads | median ms | fastest round ms | x ONNX fp32 |")
    print("|---|---|---|---|---|---|")
    for threads in sorted({1, cpu_threads()}):
        targets = {k: open_target(p, threads=threads) for k, p in paths.items()}
        for t in targets.values():
            for _ in range(20):
                t.predict(x)
        rounds: dict[tuple[str, str], list[float]] = {k: [] for k in targets}
        for _ in range(args.rounds):
            for k, t in targets.items():
                rounds[k].append(time_calls(lambda t=t: t.predict(x), 0, args.runs)["median_ms"])
        base = float(np.median(rounds[("onnx", "fp32")])) if ("onnx", "fp32") in rounds else float("nan")
        for (fmt, prec), ms in rounds.items():
            med = float(np.median(ms))
            print(f"| {targets[(fmt, prec)].runtime} | {prec} | {threads} | {med:.3f} | {min(ms):.3f} | "
                  f"{base / med:.2f} |", flush=True)


if __name__ == "__main__":
    main()
