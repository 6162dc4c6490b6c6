"""The ONNX detector bundle's NMS vs the runtime's (``edge3dfa.runtime.detect``): does the +1 pixel matter?

ONNX NonMaxSuppression has no +1 pixel in its areas; upstream's cpu_nms (kept by ``runtime.detect.nms``) has.
``converters.onnx.nms.append_nms`` can shift the compared boxes by ``area_pixel`` (0: the plain op, 1: upstream's
convention in input pixels). Two measurements, each for both settings:

1. dense random scenes (400 face-like boxes in 8 clusters, boxes of ~SIDE px, random scores, scale 1): the kept
   faces of the ONNX graph vs ``FaceBoxesDetector``'s rules on the same boxes; how many scenes differ;
2. realistic images: the three upstream example photos at 6 scales (0.1..1) and mirrored, and 20 mosaics of 12
   AFLW2000-3D crops at 160 px on a 480x640 canvas: the bundle's faces vs the runtime on PyTorch at 480x640
   (count, and IoU < 0.99 of a matched face).

Usage: python benchmarks/detector_bundle_nms.py [--side 60] [--scenes 500] [--no-photos]
"""

import argparse

import cv2
import numpy as np
import onnxruntime as ort

from edge3dfa import assets, bundle, runtime
from edge3dfa.converters.onnx.nms import append_nms, nms_on_given_boxes
from edge3dfa.runtime.detect import FaceBoxesDetector, box_iou, prepare

SIZE = (480, 640)


def random_scenes(side: float, scenes: int, p: int = 400) -> None:
    rules = FaceBoxesDetector(lambda b: (b, b))
    for px in (0.0, 1.0):
        sess = ort.InferenceSession(nms_on_given_boxes(p, area_pixel=px), providers=["CPUExecutionProvider"])
        differ = 0
        for seed in range(scenes):
            rng = np.random.default_rng(seed)
            centres = rng.uniform(0, 640, (8, 2))
            c = centres[rng.integers(0, 8, p)] + rng.normal(0, side * 0.15, (p, 2))
            wh = side * np.exp(rng.normal(0, 0.2, (p, 2)))
            boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
            scores = rng.uniform(0, 1, p).astype(np.float32)
            got, _ = sess.run(None, {"b": boxes, "s": scores})
            ref = rules._select(boxes, scores)
            differ += int(len(ref) != len(got) or not np.allclose(ref[:, :4], got))
        print(f"random scenes, boxes ~{side:g} px, area_pixel={px:g}: {differ}/{scenes} differ from the runtime's NMS")


def _images() -> list[np.ndarray]:
    photos = [runtime.read_image(assets.fetch(n)) for n in ("trump_hillary", "emma")]
    photos.append(runtime.read_image(assets.fetch("emma").parent / "JianzhuGuo.jpg"))
    out = []
    for photo in photos:
        for f in (0.1, 0.2, 0.35, 0.5, 0.75, 1.0):
            q = cv2.resize(photo, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            out += [q, np.ascontiguousarray(q[:, ::-1])]
    folder, names = assets.fetch("aflw2000_crops"), assets.fetch("aflw2000_crop_list").read_text().split()
    for m in range(20):
        canvas = np.zeros((*SIZE, 3), np.uint8)
        for k in range(12):
            r, q = divmod(k, 4)
            canvas[r * 160:(r + 1) * 160, q * 160:(q + 1) * 160] = cv2.resize(
                runtime.read_image(folder / names[m * 12 + k]), (160, 160))
        out.append(canvas)
    return out


def photos() -> None:
    import torch

    from edge3dfa.converters.onnx.export import _export
    from edge3dfa.models import Checkpoint

    source = Checkpoint.open("faceboxes").bundled(bundle.BundleOptions())
    raw = _export(source.bundle_module("NHWC", SIZE), torch.zeros((1, *SIZE, 3), dtype=torch.uint8),
                  ["prior_boxes", "prior_scores"], {}, 17)
    reference = Checkpoint.open("faceboxes").target()
    spec = FaceBoxesDetector(lambda b: tuple(reference.run(b)[:2]), input_size=SIZE)
    images = _images()
    refs = [spec(img) for img in images]
    for px in (0.0, 1.0):
        sess = ort.InferenceSession(append_nms(raw, area_pixel=px), providers=["CPUExecutionProvider"])
        differ, min_iou = 0, 1.0
        for img, ref in zip(images, refs):
            blob, scale = prepare(img, SIZE)
            boxes, scores = sess.run(None, {"image": bundle.blob_to_image_uint8(blob)})
            got = np.c_[boxes / scale, scores]
            if len(ref) != len(got):
                differ += 1
            elif len(ref):
                iou = float(box_iou(ref, got).max(axis=1).min())
                min_iou, differ = min(min_iou, iou), differ + int(iou < 0.99)
        print(f"images, area_pixel={px:g}: {len(images)} images, {sum(map(len, refs))} runtime faces, "
              f"{differ} images whose faces differ (count, or IoU < 0.99), min IoU {min_iou:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=float, default=60.0)
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--no-photos", action="store_true")
    args = ap.parse_args()
    random_scenes(args.side, args.scenes)
    if not args.no_photos:
        photos()


if __name__ == "__main__":
    main()
