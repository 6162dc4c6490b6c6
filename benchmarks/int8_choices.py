"""Int8 calibration choices, measured: set size, method, granularity, data types, float layers, bias correction.

For each model and each choice (one change from the default at a time), prints the NME change against fp32 on
the held-out AFLW crops (what --nme-budget judges on), the mean distance of the 68 landmarks from fp32's on the
same crops (image px; needs no ground truth, so it scatters far less than a ΔNME of 256 faces), the NME change
on all 2000 AFLW2000-3D crops (the evaluation set) overall and per yaw bin, that figure with the int8 kernels
replaced by fake-quant (ONNX: kernel error vs quantization error), latency (batch 1, one thread, median and
10th percentile) and size. Usage:

    python benchmarks/int8_choices.py [--models mb05,mbv3,mbv3_large] [--formats onnx,tflite,executorch]
                                      [--tflite-choices default,minmax,...] [--out out/bench]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.datasets import load_crops
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import load_heldout
from edge3dfa.fileio import write_json
from edge3dfa.measure import metrics
from edge3dfa.measure.predict import predict_all
from edge3dfa.measure.timing import time_calls
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target
from edge3dfa.targets.torch import TorchTarget

#: key -> zoo name or distilled fixture (assets fixtures/README.md; MobileNet-V3-small / large x0.5, arch inferred)
MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}
ONNX_CHOICES = {  # name -> (options, calibration crops); one change from the default each
    "default": ({}, 256), "calib 32": ({}, 32), "calib 64": ({}, 64), "calib 128": ({}, 128),
    "minmax": ({"calib_method": "minmax"}, 256), "entropy": ({"calib_method": "entropy"}, 256),
    "per-tensor": ({"per_channel": False}, 256), "u8 activations": ({"activations": "u8"}, 256),
    "u8 x u8": ({"activations": "u8", "weights": "u8"}, 256), "reduce_range": ({"reduce_range": True}, 256),
    "first conv int8": ({"float_input": False}, 256), "params layer int8": ({"float_output": False}, 256),
    "bias correction": ({"bias_correction": True}, 256),
    "per-tensor + bias correction": ({"per_channel": False, "bias_correction": True}, 256),
}
#: executorch: the float layers come from one every-layer-int8 calibration (keep_float reuses it exactly), the
#: other choices need their own calibration
EXECUTORCH_FLOAT_CHOICES = {"all int8": (), "first conv int8": ("last",), "params layer int8": ("first",),
                            "default": ("first", "last")}
EXECUTORCH_CHOICES = {"minmax": ({"observer": "minmax"}, 256), "per-tensor": ({"per_channel": False}, 256),
                      "calib 64": ({}, 64)}
_PERCENTILE = {"calib_method": "percentile"}
TFLITE_CHOICES = {"default": ({}, 256), "minmax": ({"calib_method": "minmax"}, 256),
                  "percentile 99.99": ({**_PERCENTILE, "percentile": 99.99}, 256),
                  "percentile 99.999": ({**_PERCENTILE, "percentile": 99.999}, 256),
                  "percentile 99.9999": ({**_PERCENTILE, "percentile": 99.9999}, 256), "calib 32": ({}, 32),
                  "calib 64": ({}, 64), "calib 128": ({}, 128), "params layer int8": ({"params_layer": "int8"}, 256)}


def scores(params: np.ndarray, data, aflw21: bool) -> dict:  # noqa: ANN001
    pts = runtime.landmarks(params, data.roi_boxes)
    return metrics.summarize(metrics.nme_aflw21(pts, data.gt) if aflw21 else metrics.nme(pts, data.gt), data.yaw)


def landmark_px(params: np.ndarray, ref_params: np.ndarray, data) -> float:  # noqa: ANN001
    """Mean distance (image px) of the 68 landmarks from those of ``ref_params``."""
    a, b = (runtime.landmarks(p, data.roi_boxes)[:, :2] for p in (params, ref_params))
    return float(np.linalg.norm(a - b, axis=1).mean())


def latency(path: Path) -> tuple[float, float]:
    t = open_target(path, threads=1)
    x = np.zeros((1, 3, 120, 120), np.float32)
    r = time_calls(lambda: t.predict(x), 20, 300)
    return r["median_ms"], r["p10_ms"]


def measure(path: Path, ref: dict, held, aflw, fake_quant: bool) -> dict:  # noqa: ANN001
    from edge3dfa.targets.onnxruntime import OnnxTarget

    t = open_target(path, threads=1)
    held_params = predict_all(t, held.inputs)
    row = {"heldout": metrics.delta(scores(held_params, held, True), ref["heldout"]),
           "heldout_px": landmark_px(held_params, ref["heldout_params"], held),
           "aflw2000": metrics.delta(scores(predict_all(t, aflw.inputs), aflw, False), ref["aflw2000"]),
           "size_mb": path.stat().st_size / 1e6}
    if fake_quant:
        fq = OnnxTarget(path, threads=1, optimization="disable")
        row["aflw2000_fake_quant"] = metrics.delta(scores(predict_all(fq, aflw.inputs), aflw, False), ref["aflw2000"])
    row["median_ms"], row["p10_ms"] = latency(path)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mb05,mbv3")
    ap.add_argument("--formats", default="onnx,tflite")
    ap.add_argument("--tflite-choices", default=",".join(TFLITE_CHOICES), help="names of TFLITE_CHOICES to run")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    names = args.tflite_choices.split(",")
    unknown = sorted(set(names) - set(TFLITE_CHOICES))
    if unknown:
        raise SystemExit(f"unknown --tflite-choices {unknown}; known: {', '.join(TFLITE_CHOICES)}")
    held, aflw = load_heldout(), load_crops()
    pool = load_calibration(None, count=256)
    results = {}
    for key in args.models.split(","):
        src = Checkpoint.open(MODELS[key] if key == "mb05" else assets.fetch(MODELS[key]))
        torch_t = TorchTarget(src.path, threads=1, model=src.load())
        held_params = predict_all(torch_t, held.inputs)
        ref = {"heldout": scores(held_params, held, True), "heldout_params": held_params,
               "aflw2000": scores(predict_all(torch_t, aflw.inputs), aflw, False)}
        results[key] = {"fp32": {k: ref[k] for k in ("heldout", "aflw2000")}}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if "onnx" in args.formats:
                from edge3dfa.converters import get_format

                fmt = get_format("onnx")
                fp32 = work / "fp32.onnx"
                fmt.write(src, fp32, "fp32", fmt.Options(), None)
                results[key]["onnx fp32 ms"] = latency(fp32)
                for name, (opts, n) in ONNX_CHOICES.items():
                    t0 = time.perf_counter()
                    path = work / f"{len(results[key])}.onnx"
                    sub = work / f"w{len(results[key])}"
                    sub.mkdir()
                    fmt.int8_builder(src, fmt.Options.parse(opts), pool.data[:n], sub).export(path)
                    row = {**measure(path, ref, held, aflw, True), "build_s": time.perf_counter() - t0}
                    results[key][f"onnx {name}"] = row
                    _print(key, f"onnx {name}", row)
            if "tflite" in args.formats:
                results[key].update(tflite_choices(src, pool, ref, held, aflw, work, key, names))
            if "executorch" in args.formats:
                results[key].update(executorch_choices(src, pool, ref, held, aflw, work, key))
        print(f"{key}: onnx fp32 {results[key].get('onnx fp32 ms')}, tflite fp32 {results[key].get('tflite fp32 ms')} "
              "(median, p10 ms)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "int8_choices.json", results)
    print(f"wrote {out / 'int8_choices.json'}")


def tflite_choices(src, pool, ref: dict, held, aflw, work: Path, key: str, names: list[str]) -> dict:  # noqa: ANN001
    """fp32 latency and the int8 choices of the TFLite converter, as rows keyed 'tflite NAME'."""
    from edge3dfa.converters import get_format

    fmt = get_format("tflite")
    fp32 = work / "fp32.tflite"
    fmt.write(src, fp32, "fp32", fmt.Options.parse({}), None)
    rows: dict = {"tflite fp32 ms": latency(fp32)}
    for name in names:
        opts, n = TFLITE_CHOICES[name]
        path = work / f"tflite_{len(rows)}.tflite"
        fmt.int8_builder(src, fmt.Options.parse(opts), pool.data[:n], work).export(path)
        rows[f"tflite {name}"] = measure(path, ref, held, aflw, False)
        _print(key, f"tflite {name}", rows[f"tflite {name}"])
    return rows


def executorch_choices(src, pool, ref: dict, held, aflw, work: Path, key: str) -> dict:  # noqa: ANN001
    """fp32, fp16 and the int8 choices of the ExecuTorch converter, as rows keyed 'executorch NAME'."""
    from edge3dfa.converters import get_format

    fmt = get_format("executorch")
    rows = {}
    for prec in ("fp32", "fp16"):
        path = work / f"et_{prec}.pte"
        fmt.write(src, path, prec, fmt.Options.parse({}), None)
        rows[f"executorch {prec}"] = measure(path, ref, held, aflw, False)
        _print(key, f"executorch {prec}", rows[f"executorch {prec}"])
    t0 = time.perf_counter()
    builder = fmt.int8_builder(src, fmt.Options.parse({"float_input": False, "float_output": False}), pool.data, work)
    names = list(builder.layers)
    for name, keep in EXECUTORCH_FLOAT_CHOICES.items():
        path = work / f"et_{name.replace(' ', '_')}.pte"
        builder.export(path, [names[0] if k == "first" else names[-1] for k in keep])
        rows[f"executorch {name}"] = {**measure(path, ref, held, aflw, False), "build_s": time.perf_counter() - t0}
        _print(key, f"executorch {name}", rows[f"executorch {name}"])
        t0 = time.perf_counter()
    for name, (opts, n) in EXECUTORCH_CHOICES.items():
        path = work / f"et_{name.replace(' ', '_')}.pte"
        fmt.int8_builder(src, fmt.Options.parse(opts), pool.data[:n], work).export(path)
        rows[f"executorch {name}"] = {**measure(path, ref, held, aflw, False), "build_s": time.perf_counter() - t0}
        _print(key, f"executorch {name}", rows[f"executorch {name}"])
        t0 = time.perf_counter()
    return rows


def _print(model: str, name: str, r: dict) -> None:
    b = r["aflw2000"]["bins"]
    fq = r.get("aflw2000_fake_quant", {}).get("balanced")
    fq_text = "-" if fq is None else f"{fq:+.3f}"
    print(f"| {model} | {name} | {r['heldout']['balanced']:+.3f} | {r['heldout_px']:.3f} | "
          f"{r['aflw2000']['balanced']:+.3f} | "
          + " / ".join(f"{v:+.3f}" for v in b.values())
          + f" | {fq_text} | {r['median_ms']:.2f} ({r['p10_ms']:.2f}) | {r['size_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
