"""Where the calibration/evaluation overlap check (``edge3dfa.datasets.overlap``) draws its line, measured.

Prints, in bits of the 255-bit pHash (Hamming distance to the nearest AFLW2000-3D image):

* copies, which must stay at or under ``NEAR_DUPLICATE_BITS``: every one of the 2000 crops re-encoded as
  JPEG (quality 50/70/95), resized and back (120->240->120, 120->60->120, 120->90->120), saved resized as a
  file (240, 180, 60 px); every original photo re-encoded (JPEG 50), halved, doubled, and shrunk to
  a third then re-encoded (JPEG 70). PNG re-saves decode to the same pixels: the exact test catches them.
* different images, which must stay above it: each of the 512 disjoint calibration crops (as is and
  mirrored; the first 256 are the default calibration set), the example photos.
* with ``--pasted N`` (needs torch): N crops scaled 2x and pasted into a larger photo, then detector -> roi ->
  crop as photo calibration does: what the check cannot see (the detector frames the face differently).

    python benchmarks/overlap_check.py [--pasted 40]
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from edge3dfa import assets
from edge3dfa.datasets.overlap import HASH_BITS, NEAR_DUPLICATE_BITS, hash_distance, image_hash, reference
from edge3dfa.runtime import read_image


def nearest(imgs: list[np.ndarray], hashes: np.ndarray) -> np.ndarray:
    return np.array([hash_distance(image_hash(i), hashes).min() for i in imgs])


def own(imgs: list[np.ndarray], hashes: np.ndarray) -> np.ndarray:
    """Distance of each transformed image to the hash of the image it was made from (same row)."""
    return np.array([hash_distance(image_hash(i), hashes[k:k + 1])[0] for k, i in enumerate(imgs)])


def jpeg(img: np.ndarray, q: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)


def resized(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


def row(name: str, d: np.ndarray) -> None:
    print(f"  {name:42s} min {d.min():4d}  median {np.median(d):5.1f}  p99 {np.percentile(d, 99):5.1f}  "
          f"max {d.max():4d}  (n={len(d)})")


def copies(crops: list[np.ndarray], originals: list[np.ndarray]) -> None:
    hc, ho = reference("aflw2000_crops").hashes, reference("aflw2000_original").hashes
    print(f"copies of evaluation images, distance to their own hash (must be <= {NEAR_DUPLICATE_BITS}):")
    for q in (50, 70, 95):
        row(f"crop, JPEG quality {q}", own([jpeg(c, q) for c in crops], hc))
    for s in (240, 60, 90):
        row(f"crop 120->{s}->120", own([cv2.resize(cv2.resize(c, (s, s)), (120, 120)) for c in crops], hc))
    for s in (240, 180, 60):
        row(f"crop saved at {s}x{s}", own([resized(c, s / 120) for c in crops], hc))
    row("crop at 240x240, JPEG 50", own([jpeg(resized(c, 2), 50) for c in crops], hc))
    row("original, JPEG 50", own([jpeg(o, 50) for o in originals], ho))
    row("original halved", own([resized(o, 0.5) for o in originals], ho))
    row("original doubled", own([resized(o, 2) for o in originals], ho))
    row("original a third, JPEG 70", own([jpeg(resized(o, 1 / 3), 70) for o in originals], ho))


def different() -> None:
    hc, ho = reference("aflw2000_crops").hashes, reference("aflw2000_original").hashes
    folder = assets.fetch("calibration_crops")
    files = sorted(folder.iterdir())
    cal = [read_image(p) for p in files]
    d = np.minimum(nearest(cal, hc), nearest([c[:, ::-1] for c in cal], hc))
    print(f"different images, distance to the nearest AFLW2000-3D image (must be > {NEAR_DUPLICATE_BITS}):")
    row("disjoint calibration crop (or mirrored)", d)
    row("  the first 256 (default calibration set)", d[:256])
    order = np.argsort(d)[:8]
    print("  closest calibration crops:", ", ".join(f"{files[i].name} {d[i]}" for i in order))
    photos = [read_image(assets.fetch(n)) for n in ("emma", "JianzhuGuo", "trump_hillary")]
    row("example photo vs crops", nearest(photos, hc))
    row("example photo vs original photos", nearest(photos, ho))


def pasted(crops: list[np.ndarray], n: int) -> None:
    from edge3dfa.cli import open_aligner
    from edge3dfa.runtime import crop, roi_from_box

    aligner, rng, hc = open_aligner("mb05"), np.random.default_rng(0), reference("aflw2000_crops").hashes
    dists = []
    for k in rng.choice(len(crops), n, replace=False):
        photo = np.full((400, 520, 3), rng.integers(40, 200, 3), np.uint8)
        y, x = rng.integers(0, 160), rng.integers(0, 280)
        photo[y:y + 240, x:x + 240] = resized(crops[k], 2)
        boxes = aligner.detect(photo)
        if len(boxes):
            c = cv2.resize(crop(photo, roi_from_box(boxes[:1])[0]), (120, 120))
            dists.append(hash_distance(image_hash(c), hc[k:k + 1])[0])
    print("not caught (a limit of the check): a crop scaled 2x, pasted into a photo, detector -> roi -> crop:")
    row("distance to its own crop", np.array(dists))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pasted", type=int, default=0, help="also measure N crops pasted into photos (needs torch)")
    args = p.parse_args()
    names = assets.fetch("aflw2000_crop_list").read_text().split()
    crops = [read_image(assets.fetch("aflw2000_crops") / n) for n in names]
    originals = [read_image(assets.fetch("aflw2000_original") / n) for n in names]
    print(f"pHash: {HASH_BITS} bits; near-duplicate at <= {NEAR_DUPLICATE_BITS} bits")
    copies(crops, originals)
    different()
    if args.pasted:
        pasted(crops, args.pasted)


if __name__ == "__main__":
    main()
