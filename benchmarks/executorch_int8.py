"""ExecuTorch int8 choices of issue 18, measured: params-layer bias correction, and hard-swish int8 or float.

Variants (``VARIANTS``): the former default (no bias correction), the default (``bias_correction``: the params
layer's bias shifted by int8's mean params error on the calibration crops), and the default with the
hand-written hard-swish kept float (``hard_swish=float``; skipped on models without one, e.g. mb05).
For each model: every variant built from one calibration set (the default 256 crops), then on the
held-out crops (every pool crop calibration does not use; what ``--nme-budget`` judges on): the ΔNME of each
against the model's PyTorch fp32 with its paired bootstrap 95 % interval, the departure of its 68 landmarks from
fp32's (``measure.parity.departure``, NME % of fp32's own landmarks: no ground truth, far less scatter), and the
paired difference of each variant from the former default, with intervals. ``--aflw2000`` adds the same on all 2000
AFLW2000-3D crops (the evaluation set: a check, not the choice). Latency: batch 1, one thread, the
artifacts timed round-robin (``--rounds`` rounds of ``--runs`` calls; median of the round medians and the
fastest round), so machine load hits both alike. Numbers in README "ExecuTorch" (issue 18). Usage:

    python benchmarks/executorch_int8.py [--models mbv3,mb05] [--aflw2000] [--rounds 7] [--runs 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.converters import get_format
from edge3dfa.datasets import load_crops
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import heldout_for
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.parity import departure
from edge3dfa.measure.predict import predict_all
from edge3dfa.measure.timing import time_calls
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target
from edge3dfa.targets.torch import TorchTarget

MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}
VARIANTS = {"former default": {"bias_correction": "off"},
            "default (auto)": {},
            "hard_swish float": {"hard_swish": "float"}}
BASE = "former default"


def faces(params: np.ndarray, data, aflw21: bool) -> np.ndarray:  # noqa: ANN001
    pts = runtime.landmarks(params, data.roi_boxes)
    return metrics.nme_aflw21(pts, data.gt) if aflw21 else metrics.nme(pts, data.gt)


def compare(name: str, data, ref_params: np.ndarray, params: dict[str, np.ndarray], aflw21: bool) -> None:  # noqa: ANN001
    ref = faces(ref_params, data, aflw21)
    per = {k: faces(p, data, aflw21) for k, p in params.items()}
    dep = {k: departure(ref_params, p) for k, p in params.items()}
    print(f"\n{name} ({len(data)} faces)\n| int8 | ΔNME vs fp32, balanced [95 %] | per yaw bin | "
          f"departure from fp32 (NME %) [95 %] |\n|---|---|---|---|")
    for k in params:
        d = bootstrap.paired_delta(per[k], ref, data.yaw)
        bins = " / ".join(f"{d['bins'][b]:+.3f}" for b in metrics.BIN_LABELS)
        ci = bootstrap.interval(dep[k], data.yaw)["balanced"]
        print(f"| {k} | {bootstrap.text(d)} | {bins} | {metrics.summarize(dep[k], data.yaw)['balanced']:.4f} "
              f"[{ci[0]:.4f}, {ci[1]:.4f}] |")
    for k in params:
        if k == BASE:
            continue
        d = bootstrap.paired_delta(per[k], per[BASE], data.yaw)
        dd = bootstrap.interval(dep[k] - dep[BASE], data.yaw)["balanced"]
        diff = metrics.summarize(dep[k] - dep[BASE], data.yaw)["balanced"]
        print(f"| {k} - {BASE} | {bootstrap.text(d)} | | {diff:+.4f} [{dd[0]:+.4f}, {dd[1]:+.4f}] |")


def latency(paths: dict[str, Path], rounds: int, runs: int) -> None:
    targets = {k: open_target(p, threads=1) for k, p in paths.items()}
    x = np.zeros((1, 3, 120, 120), np.float32)
    medians: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, t in targets.items():
            medians[k].append(time_calls(lambda t=t: t.predict(x), 10, runs)["median_ms"])
    each = "; ".join(f"{k}: median {np.median(v):.3f} ms, fastest round {min(v):.3f} ms"
                     for k, v in medians.items())
    print(f"\nlatency, batch 1, 1 thread ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}): {each}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mbv3,mb05")
    ap.add_argument("--aflw2000", action="store_true", help="also score all 2000 AFLW2000-3D crops")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    fmt = get_format("executorch")
    calibration = load_calibration(None, count=256)
    held = heldout_for(calibration)
    aflw = load_crops() if args.aflw2000 else None
    for key in args.models.split(","):
        source = Checkpoint.open(MODELS[key] if key == "mb05" else assets.fetch(MODELS[key]))
        torch_t = TorchTarget(source.path, threads=1, model=source.load())
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for v, values in VARIANTS.items():
                builder = fmt.int8_builder(source, fmt.Options.parse(values), calibration, Path(tmp))
                if values.get("hard_swish") == "float" and not builder.float_nodes:
                    continue  # no hand-written hard-swish: the same program as the default
                paths[v] = Path(tmp) / f"{key}_{v.replace(' ', '_')}.pte"
                builder.export(paths[v])
            print(f"\n## {key}: {source.name}")
            targets = {v: open_target(p, threads=1) for v, p in paths.items()}
            compare("held-out crops", held, predict_all(torch_t, held.inputs),
                    {v: predict_all(t, held.inputs) for v, t in targets.items()}, True)
            if aflw is not None:
                compare("AFLW2000-3D", aflw, predict_all(torch_t, aflw.inputs),
                        {v: predict_all(t, aflw.inputs) for v, t in targets.items()}, False)
            latency(paths, args.rounds, args.runs)


if __name__ == "__main__":
    main()
