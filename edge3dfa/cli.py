"""``edge3dfa`` command line: ``run`` and ``models`` here; converters and validation add their commands
through the ``edge3dfa.commands`` entry-point group (each exposes ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import cv2
import numpy as np

from edge3dfa import __version__
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import atomic_path, write_json
from edge3dfa.track import SMOOTH

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _images(inputs: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.stem.endswith("_overlay"))
            if not found:
                raise Edge3dfaError(f"no images in folder {item}")
            out += found
        elif item.exists():
            out.append(item)
        else:
            raise Edge3dfaError(f"no such file or folder: {item}")
    return out


def open_aligner(model: str = "mb05", arch: str | None = None, artifact: str | None = None,
                 detector: str | None = None, threads: int | None = None, dense_bfm: str | None = None):  # noqa: ANN201
    """The FaceAligner the CLI uses: the artifact (or PyTorch checkpoint) plus FaceBoxes."""
    from edge3dfa import assets
    from edge3dfa.pipeline import FaceAligner
    from edge3dfa.runtime import load_dense_bfm
    from edge3dfa.target import open_target

    regressor = open_target(artifact, threads=threads) if artifact else open_target(model, threads, arch=arch)
    if detector:
        det = open_target(detector, threads=threads, **({"arch": "faceboxes"} if detector.endswith(".pth") else {}))
    else:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise Edge3dfaError("torch is not installed: pass --detector with a converted FaceBoxes "
                                "artifact (.onnx or .tflite)") from e
        det = open_target(assets.fetch("faceboxes"), threads=threads, arch="faceboxes")
    return FaceAligner(regressor, det, dense=load_dense_bfm(dense_bfm) if dense_bfm else None)


def cmd_run(args: argparse.Namespace) -> int:
    from edge3dfa.video import VIDEO_SUFFIXES

    if args.camera is None and not args.inputs:
        raise Edge3dfaError("nothing to run: give images, folders or videos, or --camera N")
    videos = [Path(p) for p in args.inputs if Path(p).suffix.lower() in VIDEO_SUFFIXES]
    images = _images([p for p in args.inputs if Path(p).suffix.lower() not in VIDEO_SUFFIXES])
    if (videos or args.camera is not None) and args.dense_bfm:
        raise Edge3dfaError("--dense-bfm writes meshes for images only, not for videos or a camera")
    for v in videos:
        if not v.is_file():
            raise Edge3dfaError(f"no such video file: {v}")
    aligner = open_aligner(args.model, args.arch, args.artifact, args.detector, args.threads, args.dense_bfm)
    failures = _run_images(args, aligner, images, single=len(images) == 1 and not videos and args.camera is None)
    sources: list[str | int] = [str(v) for v in videos] + ([args.camera] if args.camera is not None else [])
    for src in sources:
        failures += _run_video(args, aligner, src, single=len(sources) == 1 and not images)
    return 2 if failures else 0


def _run_video(args: argparse.Namespace, aligner, source: str | int, single: bool) -> int:  # noqa: ANN001
    """One video file or camera through the tracker -> NAME_overlay.mp4 + NAME.jsonl; 1 when it failed."""
    from edge3dfa.track import Tracker
    from edge3dfa.video import track_video

    name = f"camera{source}" if isinstance(source, int) else Path(source).stem
    out_dir = Path(args.out_dir) if args.out_dir else (Path.cwd() if isinstance(source, int) else Path(source).parent)
    tracker = Tracker(aligner, probe=args.probe, redetect_every=args.redetect_every,
                      smooth=(args.smooth_min_cutoff, args.smooth_beta) if args.smooth else None)
    try:
        summary = track_video(tracker, source, out_dir / name, max_frames=args.max_frames)
    except Edge3dfaError as e:
        if single:
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{v} {k}" for k, v in summary["status"].items())
    print(f"{name}: {summary['frames']} frames ({counts}), {summary['fps']:.1f} fps -> {summary['jsonl']}",
          file=sys.stderr)
    return 0


def _run_images(args: argparse.Namespace, aligner, images: list[Path], single: bool) -> int:  # noqa: ANN001
    """Each image -> NAME.json + NAME_overlay.png (+ meshes); returns the number of images that failed."""
    from edge3dfa.runtime import read_image
    from edge3dfa.runtime.draw import draw_faces
    from edge3dfa.runtime.export import write_obj, write_ply

    failures = 0
    for i, path in enumerate(images, 1):
        try:
            img = read_image(path)
            faces = aligner(img)
            if not len(faces):
                raise Edge3dfaError(f"no face found in {path}")
            out_dir = Path(args.out_dir) if args.out_dir else path.parent
            stem = out_dir / path.stem
            meta = {"image": str(path), "size": list(img.shape[1::-1]), "target": aligner.regressor.name}
            overlay = draw_faces(img, faces.landmarks, faces.params, faces.boxes)
            if faces.vertices is not None:
                writer = write_obj if args.mesh == "obj" else write_ply
                for k in range(len(faces)):
                    writer(f"{stem}_{k}.{args.mesh}", faces.vertices[k], aligner.dense.tri)
            write_json(f"{stem}.json", {**meta, "faces": faces.to_json()})
            with atomic_path(f"{stem}_overlay.png") as tmp:
                if not cv2.imwrite(str(tmp), overlay):
                    raise Edge3dfaError(f"cannot write {stem}_overlay.png")
            poses = "; ".join(f"yaw {p[0]:.0f} pitch {p[1]:.0f} roll {p[2]:.0f}" for p in faces.pose)
            print(f"[{i}/{len(images)}] {path.name}: {len(faces)} face(s) ({poses}) -> {stem}.json",
                  file=sys.stderr)
        except Edge3dfaError as e:
            if single:
                raise
            failures += 1
            print(f"[{i}/{len(images)}] {path.name}: error: {e}", file=sys.stderr)
    return failures


def cmd_models(args: argparse.Namespace) -> int:
    from edge3dfa.models import MODELS

    counts: dict[str, tuple[float, float]] = {}
    try:
        from edge3dfa.models import build_model, count_macs, count_params

        for name, spec in MODELS.items():
            m = build_model(name)
            counts[name] = (count_params(m) / 1e6, count_macs(m, spec.input_size) / 1e6)
    except ImportError:
        pass  # without torch the table shows the paper's figures only
    def fig(x: float | None, fmt: str) -> str:
        return "-" if x is None or np.isnan(x) else format(x, fmt)

    rows = [("name", "arch", "widen", "input", "params M", "paper", "MACs M", "paper", "weights")]
    for name, s in MODELS.items():
        p, m = counts.get(name, (np.nan, np.nan))
        rows.append((name, s.arch, f"{s.widen_factor:g}", str(s.input_size), fig(p, ".2f"), fig(s.paper_params_m, "g"),
                     fig(m, ".1f"), fig(s.paper_macs_m, "g"), s.checkpoint_asset or "none public"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    how = "conv + linear MACs at the input size" if counts else "not computed: needs torch"
    print(f"\nparams M / MACs M: computed here ({how}); paper: the published figures, from")
    for name, s in MODELS.items():
        if s.paper_source:
            print(f"  {name}: {s.paper_source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge3dfa", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge3dfa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="landmarks, pose and params for every face in images, folders or videos")
    run.add_argument("inputs", nargs="*", help="image files, folders of images, video files (.mp4, .avi, ...)")
    run.add_argument("--model", default="mb05", help="zoo name or 3DDFA_V2 checkpoint (default: mb05)")
    run.add_argument("--arch", help="architecture of --model when it is a checkpoint (default: inferred)")
    run.add_argument("--artifact", help="converted model (.onnx, .tflite, .mlpackage) to run instead of --model")
    run.add_argument("--detector", help="FaceBoxes artifact or checkpoint (default: FaceBoxesProd.pth)")
    run.add_argument("--threads", type=int, help="threads per runtime (default: the runtime's own)")
    run.add_argument("--out-dir", help="where to write NAME.json and NAME_overlay.png (default: beside the image)")
    run.add_argument("--dense-bfm", help="full BFM (upstream bfm_noneck_v3.pkl) to also write dense meshes")
    run.add_argument("--mesh", choices=("ply", "obj"), default="ply", help="mesh format with --dense-bfm")
    video = run.add_argument_group("video and camera (-> NAME_overlay.mp4 + NAME.jsonl, one JSON line per frame)")
    video.add_argument("--camera", type=int, metavar="N", help="track faces from camera N until Ctrl-C")
    video.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    video.add_argument("--redetect-every", type=int, default=0, metavar="K",
                       help="also run the detector every K frames to pick up new faces (default 0: only on "
                            "the first frame and when a face is lost)")
    video.add_argument("--probe", type=float, default=0.1, metavar="F",
                       help="lost-track test: also regress each face in its crop shifted by F x its side; a "
                            "face's landmarks stay, a hallucinated one moves with the crop (default 0.1; 0: "
                            "off: 1.3-1.6x faster, but a face that vanishes is reported until its fit collapses)")
    video.add_argument("--smooth", action="store_true", help="one-euro smoothing of landmarks and pose")
    video.add_argument("--smooth-min-cutoff", type=float, default=SMOOTH[0], help=f"Hz at rest (default {SMOOTH[0]})")
    video.add_argument("--smooth-beta", type=float, default=SMOOTH[1],
                       help=f"cutoff rise per face size/s of speed (default {SMOOTH[1]:g})")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="the model zoo as a table")
    models.set_defaults(func=cmd_models)

    for ep in entry_points(group="edge3dfa.commands"):
        try:
            ep.load()(sub)
        except ImportError:
            continue  # the command's extra is not installed
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Edge3dfaError as e:
        print(f"edge3dfa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
