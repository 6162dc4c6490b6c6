"""``edge3dfa`` command line: ``run`` and ``models`` here; converters and validation add their commands
through the ``edge3dfa.commands`` entry-point group (each exposes ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np

from edge3dfa import __version__
from edge3dfa.errors import (
    INTERNAL_ERROR,
    INTERRUPT_SIGNALS,
    USER_ERROR,
    Edge3dfaError,
    FrameworkImportsDeferInterrupts,
    Interrupted,
    handle_termination,
)
from edge3dfa.jobs import Job
from edge3dfa.logs import ThirdPartyLog, one_line, printable, write_crash_log
from edge3dfa.runtime.meshes import MESH_FORMATS
from edge3dfa.track import SMOOTH


def open_artifact(path: str, threads: int | None = None, verify: bool = True, **options):  # noqa: ANN201
    """``open_target`` plus the one-line warning a person should see: an artifact used unchecked (``--no-verify``)
    or one without a manifest, whose provenance nothing vouches for. Checkpoints and zoo names have no manifest."""
    from edge3dfa.target import is_checkpoint, open_target

    target = open_target(path, threads=threads, verify=verify, **options)
    if not is_checkpoint(path):
        if not verify:
            _say(f"warning: --no-verify: {path} is used without checking it against its manifest")
        elif target.manifest is None:
            _say(f"warning: {path} has no manifest beside it: its origin and integrity are not verified")
    return target


def open_aligner(model: str = "mb05", arch: str | None = None, artifact: str | None = None,
                 detector: str | None = None, threads: int | None = None, dense_bfm: str | None = None,
                 verify: bool = True):  # noqa: ANN201
    """The FaceAligner the CLI uses: the artifact (or PyTorch checkpoint) plus FaceBoxes; ``verify=False``
    uses artifacts that do not match their manifests (with a warning)."""
    from edge3dfa.pipeline import FaceAligner
    from edge3dfa.runtime import load_dense_bfm
    from edge3dfa.target import open_target

    regressor = open_artifact(artifact, threads, verify) if artifact else open_target(model, threads, arch=arch)
    if detector:
        det = open_artifact(detector, threads, verify)
    else:
        if importlib.util.find_spec("torch") is None:
            raise Edge3dfaError("torch is not installed: pass --detector with a converted FaceBoxes "
                                "artifact (.onnx or .tflite)")
        det = open_target("faceboxes", threads=threads)
    return FaceAligner(regressor, det, dense=load_dense_bfm(dense_bfm) if dense_bfm else None)


def cmd_run(args: argparse.Namespace) -> int:
    from edge3dfa.jobs import plan

    if args.camera is None and not args.inputs:
        raise Edge3dfaError("nothing to run: give images, folders or videos, or --camera N")
    _check_run_options(args)
    jobs = plan(args.inputs, args.out_dir, args.camera)  # every input found and named before any work
    images = [j for j in jobs if j.kind == "image"]
    if len(images) < len(jobs) and args.dense_bfm:
        raise Edge3dfaError("--dense-bfm writes meshes for images only, not for videos or a camera")
    aligner = open_aligner(args.model, args.arch, args.artifact, args.detector, args.threads, args.dense_bfm,
                           verify=not args.no_verify)
    failures = _run_images(args, aligner, images, single=len(jobs) == 1)
    for job in jobs[len(images):]:
        failures += _run_video(args, aligner, job, single=len(jobs) == 1)
    return 2 if failures else 0


def _check_run_options(args: argparse.Namespace) -> None:
    """Numeric options in range before any work (a negative thread count crashed torch)."""
    import math

    from edge3dfa.target import check_threads

    check_threads(args.threads, "--threads")
    checks = [("--max-frames", args.max_frames, args.max_frames is None or args.max_frames >= 1, "a whole number >= 1"),
              ("--redetect-every", args.redetect_every, args.redetect_every >= 0, "a whole number >= 0 (0: off)"),
              ("--probe", args.probe, math.isfinite(args.probe) and 0 <= args.probe < 1, "from 0 (off) to below 1"),
              ("--smooth-min-cutoff", args.smooth_min_cutoff,
               math.isfinite(args.smooth_min_cutoff) and args.smooth_min_cutoff > 0, "a number of Hz > 0"),
              ("--smooth-beta", args.smooth_beta, math.isfinite(args.smooth_beta) and args.smooth_beta >= 0,
               "a number >= 0")]
    for flag, value, ok, expected in checks:
        if not ok:
            raise Edge3dfaError(f"{flag} must be {expected}, got {value}")


def _run_video(args: argparse.Namespace, aligner, job: Job, single: bool) -> int:  # noqa: ANN001
    """One video file or camera through the tracker -> NAME_overlay.mp4 + NAME.jsonl; 1 when it failed."""
    from edge3dfa.track import Tracker
    from edge3dfa.video import track_video

    tracker = Tracker(aligner, probe=args.probe, redetect_every=args.redetect_every,
                      smooth=(args.smooth_min_cutoff, args.smooth_beta) if args.smooth else None)
    try:
        if printable(job.stem) != str(job.stem):  # OpenCV's video writer takes UTF-8 names only (else it crashes)
            raise Edge3dfaError(f"cannot write {printable(job.outputs[1])}: OpenCV needs file names in UTF-8; "
                                "rename the video or use another --out-dir")
        summary = track_video(tracker, str(job.source) if job.kind == "video" else job.source, job.stem,
                              max_frames=args.max_frames)
    except Edge3dfaError as e:
        if single:
            raise
        print(f"{job.label}: error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{v} {k}" for k, v in summary["status"].items())
    print(f"{job.label}: {summary['frames']} frames ({counts}), {summary['fps']:.1f} fps -> "
          f"{printable(summary['jsonl'])}", file=sys.stderr)
    return 0


def _run_images(args: argparse.Namespace, aligner, images: list[Job], single: bool) -> int:  # noqa: ANN001
    """Each image -> NAME.json + NAME_overlay.png (+ meshes), written together; returns how many failed."""
    from edge3dfa.fileio import write_files
    from edge3dfa.runtime import read_image

    failures = 0
    for i, job in enumerate(images, 1):
        try:
            img = read_image(job.source)
            faces = aligner(img)
            if not len(faces):
                raise Edge3dfaError(f"no face found in {job.label}")
            files = _image_files(args, aligner, job, img, faces)
        except Edge3dfaError as e:
            if single:
                raise
            failures += 1
            print(f"[{i}/{len(images)}] {printable(job.source.name)}: error: {e}", file=sys.stderr)
            continue
        # outside the per-image errors: a full disk or an unwritable folder stops the run, as every image would fail
        write_files(job.outputs[0].parent, {path.name: data for path, data in files})
        poses = "; ".join(f"yaw {p[0]:.0f} pitch {p[1]:.0f} roll {p[2]:.0f}" for p in faces.pose)
        print(f"[{i}/{len(images)}] {printable(job.source.name)}: {len(faces)} face(s) ({poses}) -> "
              f"{printable(job.outputs[0])}", file=sys.stderr)
    return failures


def _image_files(args: argparse.Namespace, aligner, job: Job, img: np.ndarray, faces) -> list[tuple[Path, bytes]]:  # noqa: ANN001
    """The bytes of an image's outputs, the JSON last: meshes, the overlay, and the JSON naming both."""
    from edge3dfa.assets import sha256_bytes
    from edge3dfa.runtime.draw import draw_faces
    from edge3dfa.runtime.meshes import mesh_bytes

    files = []
    if faces.vertices is not None:
        files += [(Path(f"{job.stem}_{k}.{args.mesh}"), mesh_bytes(faces.vertices[k], aligner.dense.tri, args.mesh))
                  for k in range(len(faces))]
    json_path, overlay_path = job.outputs
    ok, png = cv2.imencode(".png", draw_faces(img, faces.landmarks, faces.params, faces.boxes))
    if not ok:
        raise Edge3dfaError(f"cannot encode the overlay of {job.label} as PNG")
    files.append((overlay_path, png.tobytes()))
    from edge3dfa.pipeline import FACES_SCHEMA

    meta = {"schema": FACES_SCHEMA, "image": str(job.source), "size": list(img.shape[1::-1]),
            "target": aligner.regressor.name,
            "overlay": overlay_path.name, "overlay_sha256": sha256_bytes(files[-1][1]),
            **({"meshes": [p.name for p, _ in files[:-1]]} if faces.vertices is not None else {})}
    text = json.dumps({**meta, "faces": faces.to_json()}, indent=2) + "\n"
    return [*files, (json_path, text.encode())]


def cmd_models(args: argparse.Namespace) -> int:
    from edge3dfa.models import MODELS

    counts: dict[str, tuple[float, float]] = {}
    try:
        from edge3dfa.models import build_model, count_macs, count_params

        for name, spec in MODELS.items():
            m = build_model(name)
            macs = count_macs(m, spec.input_size) / 1e6 if spec.input_size else np.nan  # a detector: any size
            counts[name] = (count_params(m) / 1e6, macs)
    except ImportError:
        pass  # without torch the table shows the paper's figures only
    def fig(x: float | None, fmt: str) -> str:
        return "-" if x is None or np.isnan(x) else format(x, fmt)

    rows = [("name", "task", "arch", "widen", "input", "params M", "paper", "MACs M", "paper", "weights")]
    for name, s in MODELS.items():
        p, m = counts.get(name, (np.nan, np.nan))
        rows.append((name, s.task, s.arch, f"{s.widen_factor:g}", str(s.input_size or "any"), fig(p, ".2f"),
                     fig(s.paper_params_m, "g"),
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


RUN_OUTPUTS = """Landmarks, pose and params for every face in images, folders or videos.

outputs, named after each input's file name without its suffix (NAME):
  image  NAME.json (schema edge3dfa.faces/1; faces by score, then left to right: box x1,y1,x2,y2 and
         68x3 landmarks in image pixels, pose in degrees, params) + NAME_overlay.png (+ NAME_K.ply with
         --dense-bfm), written together: all or none, an earlier result stays until the new one is complete
  video  NAME.jsonl (one line per frame) + NAME_overlay.mp4; --camera N: cameraN.jsonl + cameraN_overlay.mp4
  Two inputs that would write the same file (face.jpg and face.png) both keep their suffix instead:
  face_jpg.json, face_png.json. Inputs that still clash (p.jpg from two folders into one --out-dir) stop the
  run before it starts, naming both. Unreadable images are reported and the rest are still processed."""


EXIT_CODES = """exit codes:
  0    ok (validate/export: verdict PASSED)
  1    a gate failed or a budget was not met (verdict FAILED or NOT VERIFIED)
  2    user error: bad input, option, missing or corrupt file, full disk, no permission
  3    internal error: one line plus the path of a log with the traceback (--debug prints it)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM); 141 its output pipe was closed (e.g. | head)"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error of edge3dfa."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge3dfa", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edge3dfa {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the frameworks' own warnings (by default they go to a log file, named "
                             "at the end)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="landmarks, pose and params for every face in images, folders or videos",
                         description=RUN_OUTPUTS)
    run.add_argument("inputs", nargs="*", help="image files, folders of images, video files (.mp4, .avi, ...)")
    run.add_argument("--model", default="mb05", help="zoo name or 3DDFA_V2 checkpoint (default: mb05)")
    run.add_argument("--arch", help="architecture of --model when it is a checkpoint (default: inferred)")
    from edge3dfa.target import is_checkpoint, target_suffixes

    kinds = ", ".join(s for s in target_suffixes() if not is_checkpoint(f"x{s}"))  # the installed runtimes' files
    run.add_argument("--artifact", help=f"converted model ({kinds}) to run instead of --model")
    run.add_argument("--detector", help="FaceBoxes artifact or checkpoint (default: FaceBoxesProd.pth)")
    run.add_argument("--no-verify", action="store_true",
                     help="use --artifact/--detector even when they do not match the manifest beside them "
                          "(sha256, format, precision, input); by default a mismatch is exit 2")
    run.add_argument("--threads", type=int, help="threads per runtime (default: the runtime's own)")
    run.add_argument("--out-dir", help="where to write the outputs (default: beside each input; a camera's: here)")
    run.add_argument("--dense-bfm", help="full BFM (upstream bfm_noneck_v3.pkl) to also write dense meshes")
    run.add_argument("--mesh", choices=MESH_FORMATS, default="ply", help="mesh format with --dense-bfm")
    video = run.add_argument_group("video and camera (-> NAME_overlay.mp4 + NAME.jsonl, one JSON line per frame)")
    video.add_argument("--camera", type=int, metavar="N", help="track faces from camera N until Ctrl-C")
    video.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    video.add_argument("--redetect-every", type=int, default=0, metavar="K",
                       help="also run the detector every K frames to pick up new faces (default 0: only on "
                            "the first frame and when a face is lost)")
    video.add_argument("--probe", type=float, default=0.1, metavar="F",
                       help="lost-track test: also regress each face in its crop shifted by F x its side; a "
                            "face's landmarks stay, a hallucinated one moves with the crop (default 0.1; 0: "
                            "off: faster (README Video), but a face that vanishes is reported until its fit "
                            "collapses)")
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
    for command in sub.choices.values():  # --debug and the exit codes on every command, before or after it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.epilog = command.epilog or EXIT_CODES
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every outcome is one of the exit codes in ``EXIT_CODES``, never a traceback."""
    handle_termination()
    _closed_std_streams_to_devnull()
    _tolerant_std_streams()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version or a usage error, already printed by argparse
        return _flushed(e.code if isinstance(e.code, int) else USER_ERROR)
    third_party = None if args.verbose else ThirdPartyLog().install()
    try:
        with FrameworkImportsDeferInterrupts():
            code = _run(args, argv)
    finally:
        if third_party is not None:
            third_party.uninstall()
    if third_party is not None and (line := third_party.summary()):
        _say(line)
    return _flushed(code)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        return int(args.func(args) or 0)
    except Edge3dfaError as e:
        _say(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Interrupted as e:
        _say(f"interrupted ({e})")
        return e.exit_code
    except BrokenPipeError:
        _quiet(sys.stdout)
        return 141
    except MemoryError:
        _say("error: out of memory (try a smaller --batch or fewer --samples)")
        return USER_ERROR
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        _say(f"error: cannot use{where}: {e.strerror or e}")
        return USER_ERROR
    except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, reported with its log
        log = write_crash_log(e, None if argv is None else list(argv))
        if args.debug:
            traceback.print_exception(e)
        _say(f"internal error: {type(e).__name__}: {one_line(e)} (traceback: {log}; rerun with --debug to "
             "print it; please report it)")
        return INTERNAL_ERROR


def console() -> NoReturn:
    """The ``edge3dfa`` program: ``main()``, then the interpreter's own shutdown (torch's finalizers take a
    noticeable time) made safe from a late Ctrl-C or SIGTERM: the command's work is done and its output flushed,
    so such a signal ends the process at once with 128+signal instead of a traceback from an exit handler. A
    signal the parent ignores stays ignored (``handle_termination``)."""
    try:
        code = main()
    except KeyboardInterrupt:  # in the instant between main's last line and this one
        code = 130
    except Interrupted as e:
        code = e.exit_code
    for s in INTERRUPT_SIGNALS:
        if signal.getsignal(s) not in (None, signal.SIG_IGN):
            signal.signal(s, _exit_at_once)
    sys.exit(code)


def _exit_at_once(signum: int, _frame: object) -> None:
    os._exit(128 + signum)


def _say(message: str) -> None:
    """One line on stderr; a stderr that cannot be written (``2> /dev/full``) is given up on, not an error."""
    try:
        print(f"edge3dfa: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _quiet(sys.stderr)


def _flushed(code: int) -> int:
    """``code`` once stdout and stderr are flushed here rather than at exit, where a failure (``> /dev/full``) is
    Python's exit 120 and an 'Exception ignored' message: a full stdout is a user error (2), said on stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with the stream closed (>&-); print() writes nothing then
                stream.flush()
        except BrokenPipeError:  # edge3dfa ... | head: the reader has all it wanted
            _quiet(stream)
            code = code or 141
        except (OSError, ValueError) as e:
            _quiet(stream)
            if stream is sys.stdout:
                _say(f"error: cannot write the output: {getattr(e, 'strerror', None) or e}")
                code = code or USER_ERROR
    return code


def _closed_std_streams_to_devnull() -> None:
    """A command started with a standard stream closed (``2>&-``) writes it to /dev/null: progress bars and log
    lines then go nowhere instead of ending in an internal error, and the closed descriptor is taken by
    /dev/null, not by the next file the command opens (where a C library's warnings on fd 2 would land)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        mode = "r" if fd == 0 else "w"
        try:
            os.fstat(fd)  # open but not Python's stream: leave that descriptor alone
            stream = open(os.devnull, mode)  # noqa: SIM115 - the process's stream, open until it exits
        except OSError:  # closed: /dev/null takes the descriptor
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            stream = open(fd, mode, closefd=False)  # noqa: SIM115
        setattr(sys, name, stream)


def _tolerant_std_streams() -> None:
    """Text a terminal's encoding cannot show (Δ under ``PYTHONIOENCODING=latin-1``) is escaped, not a crash."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass  # a replaced stream (a test's capture) that cannot be reconfigured keeps its own rules


def _quiet(stream: object) -> None:
    """After a closed pipe or a full device, send what is still buffered for ``stream`` (stdout or stderr) nowhere
    instead of failing again at exit."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    console()
