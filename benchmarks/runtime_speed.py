"""Numpy runtime and PyTorch reference speed on this machine (printed, never asserted).

Targets from the foundation issue: 68-pt reconstruction + transform <= 30 us per face, dense (38,365
vertices) <= 1 ms per face, one thread; PyTorch mb05 forward at batch 1 and 64, 1 thread and all threads.
Usage: python benchmarks/runtime_speed.py [--repeats N]
"""

import os
import sys

# one BLAS thread for the runtime figures: set before numpy loads its BLAS
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from edge3dfa import runtime  # noqa: E402
from edge3dfa.runtime.bfm import BFM, reconstruct  # noqa: E402


def timeit(fn, repeats: int) -> tuple[float, float]:
    for _ in range(max(3, repeats // 20)):
        fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t)), float(np.percentile(t, 90))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
