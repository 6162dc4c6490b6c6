"""Latency of a target's ``predict`` at batch 1 and batch N, on 1 thread and on all threads.

Each runtime pins its own thread pool at construction (``open_target(path, threads=n)``), so one target
is opened per thread count rather than changing a global setting between runs. Timing is warm-up runs,
then ``runs`` timed calls of ``predict`` on real crops; median and p90 are reported, since a shared
machine gives long-tailed timings and the mean would follow the tail. ``budget_s`` caps the time spent
per setting (at least ``MIN_RUNS`` runs are still made), so a slow runtime cannot stall a report; the
number of runs actually made is reported with each figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge3dfa.target import Target, usable_cpus

MIN_RUNS = 10


def cpu_threads() -> int:
    """CPUs this process may run on (``edge3dfa.target.usable_cpus``: the affinity mask where the OS has one)."""
    return usable_cpus()


@dataclass(frozen=True)
class LatencyConfig:
    """What to time; ``runs=0`` turns latency off."""

    batch_sizes: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(sorted({1, cpu_threads()})))
    warmup: int = 10
    runs: int = 200
    budget_s: float | None = None  # max seconds of timed runs per (threads, batch) setting; None = no cap

    @property
    def enabled(self) -> bool:
        return self.runs > 0 and bool(self.batch_sizes) and bool(self.threads)


def time_calls(fn: Callable[[], object], warmup: int, runs: int, budget_s: float | None = None) -> dict[str, float]:
    """Median, p10, p90, min of up to ``runs`` timed calls after ``warmup`` untimed ones, in milliseconds.

    With ``budget_s``, timing stops once the timed calls have taken that long and ``MIN_RUNS`` are done,
    and warm-up stops after half of it (one warm-up call at least).
    """
    t_warm = time.perf_counter()
    for _ in range(warmup):
        fn()
        if budget_s is not None and time.perf_counter() - t_warm >= budget_s / 2:
            break
    t = []
    spent = 0.0
    while len(t) < runs:
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
        spent += t[-1]
        if budget_s is not None and spent >= budget_s and len(t) >= min(MIN_RUNS, runs):
            break
    ms = np.asarray(t) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()), "runs": len(ms)}


def measure(open_at: Callable[[int], Target], crops: np.ndarray, config: LatencyConfig, *,
            prepare: Callable[[np.ndarray], Any] | None = None,
            call: Callable[[Target, Any], object] | None = None) -> list[dict]:
    """Rows {threads, batch, median_ms, p90_ms, min_ms, per_image_ms, runs} for every setting of ``config``.

    ``open_at(threads)`` opens the target pinned to that many threads; ``crops`` are float32 network inputs,
    repeated when a batch needs more of them than there are. What is timed is ``call(target, prepare(batch))``
    (default ``target.predict(batch)``); ``prepare`` runs once per batch, untimed (a phone bundle's uint8 image).
    """
    prepare = prepare or (lambda x: x)
    call = call or (lambda t, x: t.predict(x))
    rows = []
    if not config.enabled:
        return rows
    for threads in config.threads:
        target = open_at(threads)
        for batch in config.batch_sizes:
            x = prepare(np.ascontiguousarray(np.resize(crops, (batch, *crops.shape[1:])), dtype=np.float32))
            r = time_calls(lambda t=target, x=x: call(t, x), config.warmup, config.runs, config.budget_s)
            rows.append({"threads": int(threads), "batch": int(batch), **r,
                         "per_image_ms": r["median_ms"] / batch})
    return rows
