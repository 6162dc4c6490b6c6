"""TFLite int8 activation ranges (``--option calib_method=...``) compared on the held-out crops, paired.

The choice of the default (``edge3dfa.converters.tflite.int8``) is made here, never on AFLW2000-3D: one float
flatbuffer per model, calibrated on the default 256 pool crops, quantized once per range choice, and every
choice scored on every pool crop calibration leaves (``heldout_for``, AFLW 21-point ground truth). Printed:
each choice's ΔNME against fp32 (PyTorch) and, paired face by face, against global min/max (the former default)
and against the current default, each with its paired bootstrap 95 % interval (``measure.bootstrap``): a
difference whose interval excludes 0 is one these faces resolve. The choices change no op of the graph (only
the int8 scales), so not its speed (``benchmarks/int8_choices.py`` times them). Usage:

    python benchmarks/tflite_ranges.py [--models mb05,mbv3] [--calib-count 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.converters import get_format
from edge3dfa.converters.tflite.int8 import clip_ranges
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import heldout_for
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.predict import predict_all
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target
from edge3dfa.targets.torch import TorchTarget

#: key -> zoo name or distilled fixture (assets fixtures/README.md)
MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}
CHOICES = {"minmax": {"calib_method": "minmax"}, "mse": {"calib_method": "mse"},
           "percentile 99.99": {"calib_method": "percentile", "percentile": 99.99},
           "percentile 99.999": {"calib_method": "percentile", "percentile": 99.999},
           "percentile 99.9999": {"calib_method": "percentile", "percentile": 99.9999}}


def per_face(params: np.ndarray, held) -> np.ndarray:  # noqa: ANN001
    return metrics.nme_aflw21(runtime.landmarks(params, held.roi_boxes), held.gt)


def compare(key: str, count: int, work: Path) -> None:
    fmt = get_format("tflite")
    opts = fmt.Options.parse({})
    default = opts.calib_method if opts.calib_method != "percentile" else f"percentile {opts.percentile:g}"
    calibration = load_calibration(None, count=count)
    held = heldout_for(calibration)
    src = Checkpoint.open(MODELS[key] if key == "mb05" else assets.fetch(MODELS[key]))
    fp32 = per_face(predict_all(TorchTarget(src.path, threads=1, model=src.load()), held.inputs), held)
    builder = fmt.int8_builder(src, fmt.Options.parse({"calib_method": "minmax"}), calibration, work)
    global_minmax = builder.qsvs
    faces = {}
    for name, values in CHOICES.items():
        builder.options = fmt.Options.parse(values)
        builder.qsvs = clip_ranges(builder.content, global_minmax, calibration.data, builder.options)
        path = work / f"{key}_{len(faces)}.tflite"
        builder.export(path)
        faces[name] = per_face(predict_all(open_target(path, threads=1), held.inputs), held)
    print(f"\n{key}: {len(held.inputs)} held-out crops ({held.subset}); default: {default}")
    print("| choice | ΔNME vs fp32 | vs minmax (paired) | vs default (paired) |\n|---|---|---|---|")
    for name, nme in faces.items():
        cells = [bootstrap.text(bootstrap.paired_delta(nme, ref, held.yaw)) for ref in (fp32, faces["minmax"],
                                                                                         faces[default])]
        print(f"| {name}{' (default)' if name == default else ''} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mb05,mbv3")
    ap.add_argument("--calib-count", type=int, default=256)
    args = ap.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; known: {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            compare(key, args.calib_count, Path(tmp))


if __name__ == "__main__":
    main()
