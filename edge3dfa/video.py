"""Video files and cameras through a :class:`~edge3dfa.track.Tracker`: an annotated NAME_overlay.mp4 and one
JSON line per frame in NAME.jsonl, moved into place together when done; an interrupted run keeps both for the
frames so far (``track_video``)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

from edge3dfa.errors import DeferredInterrupts, Edge3dfaError, Interrupted
from edge3dfa.fileio import remove_stale, replace_together, temp_folder, write_errors
from edge3dfa.runtime.draw import draw_faces
from edge3dfa.track import TrackedFrame, Tracker

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
MAX_CAMERA_INDEX = 2**31 - 1  # OpenCV takes a C int; a negative index crashes it (segfault in OpenCV 5.1)


def check_camera_index(index: int) -> None:
    """Refuse an index OpenCV cannot take before it is handed one (``cv2.VideoCapture(-1)`` segfaults)."""
    if not isinstance(index, int) or not 0 <= index <= MAX_CAMERA_INDEX:
        raise Edge3dfaError(f"camera index must be a number from 0 (the first camera), got {index}")


def open_capture(source: str | int) -> cv2.VideoCapture:
    """A video file path or a camera index -> an opened cv2.VideoCapture."""
    from edge3dfa.logs import printable

    if isinstance(source, int):
        check_camera_index(source)
        with _quiet_opencv():  # its "can't open camera by index" warnings: the error below says it once
            cap = cv2.VideoCapture(source)
        if not cap.isOpened():
            raise Edge3dfaError(f"cannot open camera {source}: no such camera, or it is in use{_cameras_here()}")
        return cap
    if not Path(source).is_file():
        raise Edge3dfaError(f"no such video file: {printable(source)}")
    if printable(source) != str(source):  # OpenCV takes file names as UTF-8 text (a non-UTF-8 one crashes it)
        raise Edge3dfaError(f"cannot open video {printable(source)}: OpenCV needs file names in UTF-8; rename it")
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise Edge3dfaError(f"cannot open video {printable(source)}")
    return cap


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    log = cv2.utils.logging
    level = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        log.setLogLevel(level)


def _cameras_here() -> str:
    """Linux: the camera devices there are, as a hint."""
    if not sys.platform.startswith("linux"):
        return ""
    found = sorted(int(p.name[5:]) for p in Path("/dev").glob("video*") if p.name[5:].isdigit())
    return f" (cameras here: {', '.join(map(str, found))})" if found else " (no /dev/video* here)"


def annotate(frame: Any, result: TrackedFrame, fps: float | None) -> Any:
    """Landmarks, pose boxes and boxes, each face's track id, and the frame's status and processing fps."""
    faces = result.faces
    out = draw_faces(frame, faces.landmarks, faces.params, faces.boxes)
    scale = max(frame.shape[:2]) / 800
    for i, box in zip(result.ids, faces.boxes):
        cv2.putText(out, f"#{i}", (int(box[0]), int(box[1]) - 4), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, scale),
                    (255, 128, 0), 1, cv2.LINE_AA)
    text = result.status + (f"  {fps:.1f} fps" if fps else "")
    cv2.putText(out, text, (8, int(24 * max(1.0, scale))), cv2.FONT_HERSHEY_SIMPLEX, max(0.5, scale),
                (0, 255, 255), 1, cv2.LINE_AA)
    return out


def track_video(tracker: Tracker, source: str | int, stem: str | Path, max_frames: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run ``tracker`` over every frame of ``source`` -> STEM_overlay.mp4 and STEM.jsonl, moved into place together.

    Frame times come from the file's frame rate, or the wall clock for a camera. Returns a summary: frames,
    frames per status, processing fps, the paths written, and ``interrupted``.

    Interrupted (Ctrl-C, SIGTERM, SIGHUP), the run stops after the frame in hand and keeps what it has: an mp4
    finalised before it is moved into place (playable) and one complete JSON line per frame in it. A camera has no
    end, so its outputs keep their names and Ctrl-C ends it normally; a file's go to STEM_overlay.partial.mp4 and
    STEM.partial.jsonl, so a complete earlier result is not replaced by part of one, and the signal then ends the
    command (exit 130/143). A second signal stops a stuck read at once, still keeping the frames so far. A complete
    run removes an earlier partial pair. An error (unreadable source, disk full) keeps nothing but what was there.
    """
    camera = isinstance(source, int)
    cap = open_capture(source)
    rate = cap.get(cv2.CAP_PROP_FPS)
    rate = rate if rate and 1 <= rate <= 240 else 30.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not camera else 0
    total = min(total, max_frames) if total > 0 and max_frames else (total or max_frames or None)
    final = Path(f"{stem}_overlay.mp4"), Path(f"{stem}.jsonl")
    partial = Path(f"{stem}_overlay.partial.mp4"), Path(f"{stem}.partial.jsonl")
    remove_stale(final[0].parent)
    bar = _progress(total, str(source), progress)
    try:
        with temp_folder(final[0].parent, final[0].name, dest=final[0]) as work, \
                write_errors(final, work), DeferredInterrupts(hold=False) as stop:
            rec = _Recorder(work / final[0].name, work / final[1].name, final, rate)
            forced = None
            try:
                ended = _loop(tracker, cap, rec, stop, camera, max_frames, bar)
            except (KeyboardInterrupt, Interrupted) as e:  # a second signal, or signals not routed through stop
                ended, forced = False, e
            finally:
                stop.hold = True  # from here on every signal waits until the outputs are in place
                rec.close()
            if rec.frames == 0 and not (stop.requested or forced):
                raise Edge3dfaError(f"no frames could be read from {source}")
            kept = _keep(rec, final if ended or camera else partial, partial if ended else ())
            if camera and stop.signum == signal.SIGINT:
                stop.consume()  # Ctrl-C is how a camera run ends
            elif kept and not ended:
                print(f"{'camera ' if camera else ''}{source}: interrupted after {rec.frames} frames; kept {kept[0]} "
                      f"and {kept[1]}", file=sys.stderr, flush=True)
            if forced is not None and not stop.requested:
                raise forced
    finally:
        bar.close()
        cap.release()
    elapsed = time.perf_counter() - rec.t0
    video, lines = kept or final
    return {"frames": rec.frames, "status": rec.counts, "fps": rec.frames / elapsed if elapsed > 0 else 0.0,
            "video": str(video), "jsonl": str(lines), "interrupted": not ended}


def _progress(total: int | None, desc: str, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", file=sys.stderr, disable=not show, desc=desc)


def _loop(tracker: Tracker, cap: cv2.VideoCapture, rec: _Recorder, stop: DeferredInterrupts, camera: bool,
          max_frames: int | None, bar: Any) -> bool:
    """Track frames until the source ends or ``max_frames`` (True) or a signal asks to stop (False)."""
    while max_frames is None or rec.frames < max_frames:
        if stop.requested:
            return False
        ok, frame = cap.read()
        if not ok:
            return True
        t = time.perf_counter() - rec.t0 if camera else rec.frames / rec.rate
        result = tracker.update(frame, t)
        stop.hold = True  # a frame and its JSON line are written together
        rec.add(frame, result, t)
        stop.hold = False
        bar.set_postfix_str(f"{result.status}, {len(result.faces)} face(s)", refresh=False)
        bar.update(1)
    return True


class _Recorder:
    """The annotated mp4 and the JSON lines being written (in a temp folder), frame by frame."""

    def __init__(self, video: Path, lines: Path, dests: tuple[Path, Path], rate: float) -> None:
        self.video, self.lines, self.dests, self.rate = video, lines, dests, rate
        self.writer: cv2.VideoWriter | None = None
        self.file = open(lines, "w")  # noqa: SIM115 - closed by close()
        self.frames, self.counts, self.t0 = 0, {}, time.perf_counter()

    def add(self, frame: Any, result: TrackedFrame, t: float) -> None:
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.video), cv2.VideoWriter_fourcc(*"mp4v"), self.rate,
                                          frame.shape[1::-1])
            if not self.writer.isOpened():
                raise Edge3dfaError(f"cannot write {self.dests[0]} (no mp4v encoder in this OpenCV?)")
        line = json.dumps({"time": round(t, 4), **result.to_json()}) + "\n"
        image = annotate(frame, result, (self.frames + 1) / max(time.perf_counter() - self.t0, 1e-9))
        try:
            self.file.write(line)
        except OSError as e:
            raise Edge3dfaError(f"cannot write {self.dests[1]}: {e.strerror or e}") from e
        self.writer.write(image)
        self.frames += 1
        self.counts[result.status] = self.counts.get(result.status, 0) + 1

    def close(self) -> None:
        """Finalise the mp4 (its index is written on release) and close the JSON lines."""
        if self.writer is not None:
            self.writer.release()
        try:
            self.file.close()
        except OSError as e:
            raise Edge3dfaError(f"cannot write {self.dests[1]}: {e.strerror or e}") from e


def _keep(rec: _Recorder, dests: tuple[Path, Path], superseded: tuple[Path, ...]) -> tuple[Path, Path] | None:
    """Move the finished mp4 and JSON lines onto ``dests`` together, once the mp4 is known to hold every frame."""
    if rec.frames == 0:
        return None
    cap = cv2.VideoCapture(str(rec.video))
    written = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    cap.release()
    if written != rec.frames:
        free = shutil.disk_usage(rec.video.parent).free / 1e6
        raise Edge3dfaError(f"cannot write {rec.dests[0]}: the encoder wrote {written} of {rec.frames} frames "
                            f"({free:.0f} MB free on its disk)")
    replace_together([(rec.video, dests[0]), (rec.lines, dests[1])])
    for p in superseded:
        p.unlink(missing_ok=True)
    return dests
