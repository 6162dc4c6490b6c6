"""The TFLite phone bundles on one side of ``make pi-check``: their outputs against the spec, for pi_compare.py.

A bundle does the runtime's post-processing inside the model (``edge3dfa.bundle``), so on a Pi the question is
whether LiteRT's ARM kernels still give what ``edge3dfa.bundle.reference`` says. No torch is there, so the
network's params come from the fp32 *params* artifact of the same checkpoint (the one the rest of the check
runs; its parity with PyTorch is in its manifest), and the spec is computed from them in numpy:

- ``spec``: each regressor bundle (``--bundle PRECISION=FILE``) on AFLW2000-3D crops through
  ``Target.predict_bundle``: its landmarks (3-D, 120x120 crop px) and pose against the spec of the fp32 params
  artifact (``vs_network``; for int8 this is the quantization's error), of the params artifact of its own
  precision (``vs_same_precision``: the bundle is the artifact the check validates, plus post-processing) and
  of its own params output (``vs_own_params``: the in-model post-processing alone, float in every precision).
- ``crops``: the same landmarks mapped to the photo with the published roi boxes (``bundle.to_photo``), unrounded,
  so pi_compare.py can hold the arm64 side to the x86 side as it does the params artifacts.
- ``detector``: the detector bundle on the photos (``FaceBoxesDetector.of_target``, as ``edge3dfa run``) and the
  runtime's decode + NMS over the FaceBoxes params artifact on the same photos: boxes of both.
- ``imports``: a fresh interpreter that opens and runs every bundle through ``open_target`` and lists the
  top-level modules that loaded (beyond those it started with) outside the standard library and edge3dfa (the
  ``[pi]`` promise: numpy, OpenCV and LiteRT only). Gates are pi_compare.py's; this only measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys

from edge3dfa import bundle, runtime
from edge3dfa.fileio import write_json
from edge3dfa.jobs import list_images
from edge3dfa.manifest import tool_versions
from edge3dfa.measure.parity import bundle_departure, head_departure
from edge3dfa.measure.predict import predict_all, predict_bundle_all
from edge3dfa.runtime.detect import FaceBoxesDetector
from edge3dfa.target import open_target

#: run in a fresh interpreter: open and run each bundle, then the non-stdlib top-level modules that loaded (not
#: those the interpreter had at start, such as Debian's sitecustomize)
_IMPORT_PROBE = """
import sys
at_start = set(sys.modules)
import json
import numpy as np
from edge3dfa.target import open_target
for path in sys.argv[1:]:
    t = open_target(path, threads=1)
    h, w = t.input_shape[1:]
    if t.bundle["kind"] == "regressor":  # a grey crop, normalised: (64 - 127.5) / 128
        t.predict_bundle(np.full((1, 3, h, w), (64 - 127.5) / 128, np.float32))
    else:  # a blob of the mean colour
        t.run(np.zeros((1, 3, h, w), np.float32))
top = {m.split(".")[0] for m in set(sys.modules) - at_start} - set(sys.stdlib_module_names) - {"edge3dfa"}
print(json.dumps(sorted(m for m in top if not m.startswith("_"))))
"""


def regressor_bundles(bundles: dict[str, str], params_artifacts: dict[str, str], crops: int,
                      threads: int) -> tuple[dict, dict]:
    """(spec stats per precision, photo-px landmarks per precision and crop) on ``crops`` AFLW2000-3D crops;
    ``params_artifacts``: the params artifact of each precision, fp32 among them."""
    from edge3dfa.datasets import load_crops

    data = load_crops(crops)
    specs = {p: bundle.reference(predict_all(open_target(path, threads), data.inputs))
             for p, path in params_artifacts.items()}
    spec, dumps = {}, {}
    for precision, path in bundles.items():
        target = open_target(path, threads)
        got = predict_bundle_all(target, data.inputs)
        spec[precision] = {"file": path, "crops": len(data.files),
                           "vs_network": bundle_departure(got, specs["fp32"]),
                           "vs_same_precision": bundle_departure(got, specs[precision]) if precision in specs else None,
                           "vs_own_params": head_departure(got)}
        photo = bundle.to_photo(got["landmarks"], data.roi_boxes)
        dumps[precision] = {name: [lm] for name, lm in zip(data.files, photo.tolist())}
    return spec, dumps


def detector_boxes(detector_bundle: str, detector: str, inputs: list[str], threads: int) -> dict:
    """Boxes [K,5] (photo px, score) of the detector bundle and of the runtime over the params detector."""
    bundled = FaceBoxesDetector.of_target(open_target(detector_bundle, threads))
    plain = FaceBoxesDetector.of_target(open_target(detector, threads))
    out = {}
    for path in list_images(inputs):
        img = runtime.as_bgr_uint8(runtime.read_image(path))
        out[path.name] = {"bundle": bundled(img).tolist(), "runtime": plain(img).tolist()}
    return out


def imported_modules(paths: list[str]) -> list[str]:
    """Top-level non-stdlib modules a fresh interpreter loads to open and run ``paths`` (bundles)."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *paths], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"pi_bundles: the import probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected PRECISION=FILE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="photos (files or folders) for the detector bundle")
    p.add_argument("--bundle", required=True, type=_pair, action="append",
                   help="PRECISION=FILE of a regressor bundle, e.g. fp32=mb05_fp32_bundle.tflite (repeatable)")
    p.add_argument("--params-artifact", required=True, type=_pair, action="append",
                   help="PRECISION=FILE of a params artifact the spec is computed from; fp32 is required "
                        "(repeatable)")
    p.add_argument("--detector-bundle", required=True, help="FaceBoxes bundle, e.g. faceboxes_fp32_bundle.tflite")
    p.add_argument("--detector", required=True, help="FaceBoxes params artifact, e.g. faceboxes_fp32.tflite")
    p.add_argument("--crops", type=int, default=50, help="AFLW2000-3D crops, evenly spaced (default: 50)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default: 1)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)

    bundles, params = dict(args.bundle), dict(args.params_artifact)
    if "fp32" not in params:
        p.error("--params-artifact fp32=FILE is required (the spec of the network)")
    spec, crops = regressor_bundles(bundles, params, args.crops, args.threads)
    write_json(args.out, {
        "machine": platform.machine(), "python": platform.python_version(),
        "versions": tool_versions("ai-edge-litert", "tflite-runtime"),
        "importable": {m: importlib.util.find_spec(m) is not None for m in ("torch", "tensorflow")},
        "imports": imported_modules([*bundles.values(), args.detector_bundle]),
        "spec": spec, "crops": crops,
        "detector": detector_boxes(args.detector_bundle, args.detector, args.inputs, args.threads)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
