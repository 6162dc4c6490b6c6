"""CoreML int8 choices (int8 weights and activations), measured: which layers stay float, and how ranges are set.

For each model and each choice (one change from the defaults at a time, plus the former defaults), prints the
NME change against PyTorch on the held-out AFLW crops (what --nme-budget judges on, and what the defaults were
chosen on), on all 2000 AFLW2000-3D crops and on the 1000 evenly spaced ones `edge3dfa export` scores by default,
with the mean and worst 68-landmark distance to PyTorch in 120x120 crop pixels. fp16 and w8 rows give the scale
of what plain fp16 compute and int8 weights cost. Every artifact is run by the numpy MIL evaluator (CoreML
predict needs macOS), so no latency here. Usage:

    python benchmarks/coreml_int8.py [--models mb05,mbv3] [--out out/bench]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.converters import get_format
from edge3dfa.datasets import load_crops
from edge3dfa.datasets.aflw2000_3d import select
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.fileio import write_json
from edge3dfa.measure import metrics
from edge3dfa.measure.predict import predict_all
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.targets.coreml import CoreMLTarget
from edge3dfa.targets.torch import TorchTarget

MODELS = {"mb05": ("mb05", None), "mbv3": (None, "mbv3_05")}  # mbv3: the distilled fixture
CALIBRATIONS = {"percentile 99.999": {}, "percentile 99.99": {"percentile": 99.99},
                "minmax": {"calib_method": "minmax"}}
#: name -> (calibration, options changing the float layers); "default" is CoreMLOptions' defaults
CHOICES = {"default": ("percentile 99.999", {}), "percentile 99.99": ("percentile 99.99", {}),
           "minmax": ("minmax", {}), "first conv float too": ("percentile 99.999", {"float_input": True}),
           "params layer int8": ("percentile 99.999", {"float_output": False}),
           "symmetric activations (the former default)": ("percentile 99.999", {"activations": "symmetric"}),
           "former default (minmax, every layer int8)": ("minmax", {"float_output": False})}


def scores(params: np.ndarray, data, aflw21: bool) -> dict:  # noqa: ANN001
    pts = runtime.landmarks(params, data.roi_boxes)
    return metrics.summarize(metrics.nme_aflw21(pts, data.gt) if aflw21 else metrics.nme(pts, data.gt), data.yaw)


def crop_px(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-landmark 2-D distance (120x120 crop pixels) between the landmarks of two param sets."""
    roi = np.tile(np.array([[0, 0, runtime.INPUT_SIZE, runtime.INPUT_SIZE]], np.float32), (len(ref), 1))
    a, b = (runtime.to_image(runtime.reconstruct(runtime.denormalise(p)), roi) for p in (ref, got))
    return np.linalg.norm(a[:, :2].astype(np.float64) - b[:, :2], axis=1)


def measure(path: Path, ref: dict, held, aflw, half: np.ndarray) -> dict:  # noqa: ANN001
    t = CoreMLTarget(path, threads=1, backend="mil")
    p_aflw = predict_all(t, aflw.inputs)
    s_all = scores(p_aflw, aflw, False)
    s_half = metrics.summarize(s_all_errors(p_aflw, aflw)[half], aflw.yaw[half])
    px = crop_px(ref["aflw2000_params"], p_aflw)
    return {"heldout": metrics.delta(scores(predict_all(t, held.inputs), held, True), ref["heldout"]),
            "aflw2000": metrics.delta(s_all, ref["aflw2000"]), "aflw2000_1000": metrics.delta(s_half, ref["half"]),
            "px_mean": float(px.mean()), "px_max": float(px.max()),
            "size_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6}


def s_all_errors(params: np.ndarray, data) -> np.ndarray:  # noqa: ANN001
    return metrics.nme(runtime.landmarks(params, data.roi_boxes), data.gt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mb05,mbv3")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    from edge3dfa.datasets.heldout import load_heldout

    held, aflw = load_heldout(), load_crops()
    half = select(1000)  # the rows `edge3dfa export` scores by default (all 2000 loaded in protocol order)
    pool = load_calibration(None, count=256)
    results: dict = {}
    print("| model | choice | held-out Δ bal | AFLW2000-3D Δ bal (2000) | Δ per yaw bin (2000) | Δ bal (1000) | "
          "Δ per yaw bin (1000) | px mean / max | MB |")
    for key in args.models.split(","):
        zoo, arch = MODELS[key]
        src = Checkpoint.open(zoo or assets.fetch("mbv3_05_distilled"), arch)
        torch_t = TorchTarget(src.path, threads=1, model=src.load())
        p_ref = predict_all(torch_t, aflw.inputs)
        ref = {"heldout": scores(predict_all(torch_t, held.inputs), held, True), "aflw2000": scores(p_ref, aflw, False),
               "half": metrics.summarize(s_all_errors(p_ref, aflw)[half], aflw.yaw[half]), "aflw2000_params": p_ref}
        results[key] = {}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fmt = get_format("coreml")
            for prec in ("fp16", "w8"):
                path = work / f"{prec}.mlpackage"
                fmt.write(src, path, prec, fmt.Options.parse({}), None)
                _record(results[key], key, prec, measure(path, ref, held, aflw, half))
            builders = {}
            for name, opts in CALIBRATIONS.items():
                t0 = time.perf_counter()
                builders[name] = fmt.int8_builder(src, fmt.Options.parse(opts), pool, work)
                print(f"{key}: {name} calibration {time.perf_counter() - t0:.0f} s", flush=True)
            for name, (calib, opts) in CHOICES.items():
                b = copy.copy(builders[calib])
                b.options = b.options.replace(**opts)
                b.always_float = b._always_float()  # noqa: SLF001 - benchmark internals: same ranges, other layers
                path = work / f"{len(results[key])}.mlpackage"
                b.export(path)
                _record(results[key], key, f"int8 {name}", measure(path, ref, held, aflw, half))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "coreml_int8.json", results)
    print(f"wrote {out / 'coreml_int8.json'}")


def _record(results: dict, model: str, name: str, r: dict) -> None:
    results[name] = r
    bins = " / ".join(f"{v:+.3f}" for v in r["aflw2000"]["bins"].values())
    half_bins = " / ".join(f"{v:+.3f}" for v in r["aflw2000_1000"]["bins"].values())
    print(f"| {model} | {name} | {r['heldout']['balanced']:+.3f} | {r['aflw2000']['balanced']:+.3f} | {bins} | "
          f"{r['aflw2000_1000']['balanced']:+.3f} | {half_bins} | {r['px_mean']:.2f} / {r['px_max']:.1f} | "
          f"{r['size_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
