"""Video frames per second: FaceBoxes + regressor on every frame vs tracking (re-crop from the previous
landmarks, probe crop included), per runtime (PyTorch, ONNX, TFLite fp32), 1 thread and all threads.

Printed, never asserted. The clip is synthetic and held in memory (decoding and drawing are not timed): a
640x480 frame (the webcam size the TFLite detector is exported at) with one ~180 px face that moves, scales
and rotates for ``--frames`` frames. Each figure is the median over ``--runs`` passes of the whole clip,
modes taken round-robin so load from other users of the machine hits them alike. mb05 and FaceBoxes are
converted to ONNX and TFLite fp32 in a temp folder (or ``--out`` to keep them), or given with ``--artifact``.
Usage: python benchmarks/video_speed.py [--frames 60] [--runs 5] [--targets torch,onnx,tflite]
                                        [--artifact mb05_fp32.onnx faceboxes_fp32.onnx ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.measure.timing import time_calls
from edge3dfa.pipeline import FaceAligner
from edge3dfa.target import open_target
from edge3dfa.track import Tracker

W, H = 640, 480


def make_clip(n: int) -> list[np.ndarray]:
    """JianzhuGuo.jpg's face (~180 px roi) moving over a textured background: shift, scale, in-plane rotation."""
    photo = runtime.read_image(assets.fetch("JianzhuGuo"))
    rng = np.random.default_rng(0)
    bg = cv2.normalize(cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 6),
                       None, 60, 200, cv2.NORM_MINMAX)
    frames = []
    for t in range(n):
        u = t / max(1, n - 1)
        m = cv2.getRotationMatrix2D((205.0, 235.0), 15 * np.sin(2 * np.pi * u), 0.75 * (1 + 0.15 * np.sin(np.pi * u)))
        m[:, 2] += np.array([W / 2 + 100 * np.sin(2 * np.pi * u), H / 2 + 20 * np.sin(4 * np.pi * u)]) - (205, 235)
        frame = bg.copy()
        cv2.warpAffine(photo, m, (W, H), dst=frame, borderMode=cv2.BORDER_TRANSPARENT)
        frames.append(np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8))
    return frames


def artifacts(targets: list[str], given: list[list[str]], out: str) -> dict[str, tuple[str, str]]:
    """Format -> (regressor, detector) paths: given with --artifact, else converted (fp32) into ``out``."""
    from edge3dfa.converters import convert

    pairs = {"torch": ("mb05", str(assets.fetch("faceboxes")))}
    for reg, det in given:
        pairs[Path(reg).suffix.lstrip(".")] = (reg, det)
    todo = [t for t in targets if t not in pairs]
    if todo:
        found = {}
        for model in ("mb05", "faceboxes"):
            for art in convert(model, to=todo, precision="fp32", out_dir=out, verbose=True):
                found[(model, art.manifest.format)] = str(art.path)
        for fmt in todo:
            pairs[fmt] = (found[("mb05", fmt)], found[("faceboxes", fmt)])
    return pairs


def open_aligner(reg: str, det: str, threads: int) -> FaceAligner:
    regressor = open_target(reg, threads=threads)
    detector = open_target(det, threads=threads, **({"arch": "faceboxes"} if det.endswith(".pth") else {}))
    return FaceAligner(regressor, detector)


def per_frame_detection(aligner: FaceAligner, frames: list[np.ndarray]) -> int:
    for f in frames:
        aligner(f)
    return len(frames)


def tracking(aligner: FaceAligner, frames: list[np.ndarray], probe: float) -> int:
    tracker = Tracker(aligner, probe=probe)
    return sum(tracker.update(f).status != "tracked" for f in frames)  # detector runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--runs", type=int, default=5, help="passes over the clip per figure (median)")
    ap.add_argument("--targets", default="torch,onnx,tflite")
    ap.add_argument("--artifact", nargs=2, action="append", default=[], metavar=("REGRESSOR", "DETECTOR"),
                    help="a converted regressor and FaceBoxes of one format, instead of converting")
    ap.add_argument("--out", help="convert into this folder and keep the artifacts (default: a temp folder)")
    ap.add_argument("--threads", help="thread counts, comma separated (default: 1 and all)")
    args = ap.parse_args()
    targets = args.targets.split(",")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    frames = make_clip(args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = artifacts(targets, args.artifact, args.out or tmp)
        print(f"{args.frames} frames {W}x{H}, median of {args.runs} runs, frames per second")
        print(f"{'target':8s} {'threads':>7s} {'detect every frame':>19s} {'tracking':>9s} {'speed-up':>9s} "
              f"{'tracking, no probe':>19s} {'detector runs':>14s}")
        for target in targets:
            reg, det = pairs[target]
            for n in threads:
                cv2.setNumThreads(n)
                aligner = open_aligner(reg, det, n)
                modes = {"detect": lambda a=aligner: per_frame_detection(a, frames),
                         "track": lambda a=aligner: tracking(a, frames, 0.1),
                         "noprobe": lambda a=aligner: tracking(a, frames, 0.0)}
                runs = modes["track"]()  # warm-up; tracking returns how often the detector ran
                for k, fn in modes.items():
                    if k != "track":
                        fn()
                times: dict[str, list[float]] = {k: [] for k in modes}
                for _ in range(args.runs):  # round-robin: a change of load hits every mode alike
                    for k, fn in modes.items():
                        times[k].append(time_calls(fn, 0, 1)["median_ms"] / 1e3)
                fps = {k: args.frames / statistics.median(v) for k, v in times.items()}
                print(f"{target:8s} {n:7d} {fps['detect']:19.1f} {fps['track']:9.1f} "
                      f"{fps['track'] / fps['detect']:8.1f}x {fps['noprobe']:19.1f} {runs:14d}", flush=True)
    cv2.setNumThreads(-1)


if __name__ == "__main__":
    main()
