"""How much of int8's speed-up survives the layers kept float: fp32 vs every-layer int8 vs the default / budget
artifact, per model and format, batch 1, on 1 thread and on all threads.

The variants are timed round-robin (``--rounds`` rounds of ``--runs`` calls each, median per round, then the
median of rounds), so a change of machine load hits every variant alike. "kept" = (fp32 - mixed) /
(fp32 - all int8): the share of the all-int8 speed-up the mixed artifact keeps. Usage:

    python benchmarks/int8_speed.py [--models mb05,mbv3,mbv3_large] [--formats onnx,tflite] [--keep LAYER ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge3dfa import assets
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.measure.timing import cpu_threads, time_calls
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target

#: key -> zoo name or distilled fixture (assets fixtures/README.md; MobileNet-V3-small / large x0.5, arch inferred)
MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}
#: every layer int8 (the starting point of the budget search) for each format
ALL_INT8 = {"onnx": {"float_input": False, "float_output": False}, "tflite": {"params_layer": "int8"}}


def variants(name: str, src, calib, work: Path, keep: list[str]) -> dict[str, Path]:  # noqa: ANN001
    """fp32, every layer int8, the default int8 (and it with ``keep`` layers float), through the format protocol."""
    from edge3dfa.converters import get_format

    fmt = get_format(name)
    out = {"fp32": work / f"fp32{fmt.suffix}"}
    fmt.write(src, out["fp32"], "fp32", fmt.Options.parse({}), None)
    for label, opts in (("all int8", ALL_INT8[name]), ("default int8", {})):
        sub = work / label.replace(" ", "_")
        sub.mkdir()
        builder = fmt.int8_builder(src, fmt.Options.parse(opts), calib, sub)
        out[label] = sub / f"m{fmt.suffix}"
        builder.export(out[label])
        if keep and label == "default int8":
            out[f"default + {len(keep)} float"] = sub / f"k{fmt.suffix}"
            builder.export(out[f"default + {len(keep)} float"], keep)
    return out


def time_round_robin(paths: dict[str, Path], threads: int, rounds: int, runs: int) -> dict[str, float]:
    targets = {k: open_target(p, threads=threads) for k, p in paths.items()}
    x = np.zeros((1, 3, 120, 120), np.float32)
    for t in targets.values():
        for _ in range(20):
            t.predict(x)
    medians: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(rounds):
        for k, t in targets.items():
            medians[k].append(time_calls(lambda t=t: t.predict(x), 0, runs)["median_ms"])
    return {k: float(np.median(v)) for k, v in medians.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mb05,mbv3")
    ap.add_argument("--formats", default="onnx,tflite")
    ap.add_argument("--keep", nargs="*", default=[], help="extra layers to keep float (names from a budget record)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    calib = load_calibration(None, count=256)
    print("| model | format | threads | fp32 ms | all int8 ms | variant | variant ms | kept of int8 speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        src = Checkpoint.open(MODELS[key] if key == "mb05" else assets.fetch(MODELS[key]))
        for fmt in args.formats.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                paths = variants(fmt, src, calib, Path(tmp), args.keep if fmt == "onnx" else [])
                for threads in sorted({1, cpu_threads()}):
                    ms = time_round_robin(paths, threads, args.rounds, args.runs)
                    fp32, full = ms["fp32"], ms["all int8"]
                    for variant in [k for k in ms if k not in ("fp32", "all int8")]:
                        kept = (fp32 - ms[variant]) / (fp32 - full) if fp32 > full else float("nan")
                        print(f"| {key} | {fmt} | {threads} | {fp32:.3f} | {full:.3f} | {variant} | "
                              f"{ms[variant]:.3f} | {kept:.0%} |", flush=True)


if __name__ == "__main__":
    main()
