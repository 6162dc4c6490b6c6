"""Full-precision landmarks of photos (the ``edge3dfa run`` aligner) and of AFLW2000-3D crops, for pi_compare.py.

``edge3dfa run`` rounds landmarks to 0.001 px in its JSON, too coarse to prove two machines agree within
0.001 px; this writes them unrounded, with the machine and package versions. Two sets: ``images``, the
photos through FaceBoxes -> crop -> regressor -> numpy runtime, exactly as ``edge3dfa run``, with a digest of
each detector input (OpenCV's resize makes it differ between ARM and x86 builds); and ``crops``, published
120x120 crops (no resize anywhere) through the regressor and the numpy runtime, mapped back to the photo with
the published roi boxes: identical inputs on both machines, so any difference is the runtime's or the
model's. Needs only the ``pi`` install and says whether torch or tensorflow could be imported where it ran.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import platform
import sys

from edge3dfa import runtime
from edge3dfa.cli import open_aligner
from edge3dfa.fileio import write_json
from edge3dfa.jobs import list_images
from edge3dfa.manifest import tool_versions
from edge3dfa.runtime.detect import prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--artifact", required=True, help="regressor artifact, e.g. mb05_fp32.tflite")
    p.add_argument("--detector", required=True, help="FaceBoxes artifact, e.g. faceboxes_fp32.tflite")
    p.add_argument("--crops", type=int, default=0, help="AFLW2000-3D crops, evenly spaced (default: 0, none)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default: 1)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)

    aligner = open_aligner(artifact=args.artifact, detector=args.detector, threads=args.threads)
    images = {}
    for path in list_images(args.inputs):
        img = runtime.read_image(path)
        blob, _ = prepare(runtime.as_bgr_uint8(img), aligner.detector.input_size)
        faces = aligner(img)
        images[path.name] = {"detector_input_sha256": hashlib.sha256(blob.tobytes()).hexdigest(),
                             "boxes": faces.boxes.tolist(), "roi_boxes": faces.roi_boxes.tolist(),
                             "landmarks": faces.landmarks.tolist(), "params": faces.params.tolist()}
    crops = {}
    if args.crops:
        from edge3dfa.datasets import load_crops
        from edge3dfa.measure.predict import predict_all

        data = load_crops(args.crops)
        pts = runtime.landmarks(predict_all(aligner.regressor, data.inputs), data.roi_boxes)
        crops = {name: [lm] for name, lm in zip(data.files, pts.tolist())}
    write_json(args.out, {
        "machine": platform.machine(), "python": platform.python_version(), "target": aligner.regressor.name,
        "versions": tool_versions("ai-edge-litert", "tflite-runtime"),
        "importable": {m: importlib.util.find_spec(m) is not None for m in ("torch", "tensorflow")},
        "loaded": sorted(m for m in ("torch", "tensorflow") if m in sys.modules),
        "images": images, "crops": crops})
    return 0


if __name__ == "__main__":
    sys.exit(main())
