"""Video files and cameras through a :class:`~edge3dfa.track.Tracker`: an annotated NAME_overlay.mp4 and one
JSON line per frame in NAME.jsonl, both written atomically (a camera run stopped with Ctrl-C keeps them)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import atomic_path
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
    """Run ``tracker`` over every frame of ``source`` -> writes STEM_overlay.mp4 and STEM.jsonl.

    Frame times come from the file's frame rate, or the wall clock for a camera. Returns a summary:
    frames, frames per status, processing fps.
    """
    from tqdm import tqdm

    camera = isinstance(source, int)
    cap = open_capture(source)
    rate = cap.get(cv2.CAP_PROP_FPS)
    rate = rate if rate and 1 <= rate <= 240 else 30.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not camera else 0
    total = min(total, max_frames) if total > 0 and max_frames else (total or max_frames or None)
    counts: dict[str, int] = {}
    n, t0 = 0, time.perf_counter()
    video_path, lines_path = Path(f"{stem}_overlay.mp4"), Path(f"{stem}.jsonl")
    bar = tqdm(total=total, unit="frame", file=sys.stderr, disable=not progress, desc=str(source))
    writer = None
    try:
        with atomic_path(video_path) as vtmp, atomic_path(lines_path) as ltmp, open(ltmp, "w") as lines:
            try:
                while max_frames is None or n < max_frames:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    t = time.perf_counter() - t0 if camera else n / rate
                    result = tracker.update(frame, t)
                    n += 1
                    counts[result.status] = counts.get(result.status, 0) + 1
                    fps = n / (time.perf_counter() - t0)
                    if writer is None:
                        writer = cv2.VideoWriter(str(vtmp), cv2.VideoWriter_fourcc(*"mp4v"), rate,
                                                 frame.shape[1::-1])
                        if not writer.isOpened():
                            raise Edge3dfaError(f"cannot write {video_path} (no mp4v encoder in this OpenCV?)")
                    writer.write(annotate(frame, result, fps))
                    lines.write(json.dumps({"time": round(t, 4), **result.to_json()}) + "\n")
                    bar.set_postfix_str(f"{result.status}, {len(result.faces)} face(s)", refresh=False)
                    bar.update(1)
            except KeyboardInterrupt:
                if not camera:
                    raise  # a half-processed file is not kept; a camera run ends with Ctrl-C
            if n == 0:
                raise Edge3dfaError(f"no frames could be read from {source}")
            writer.release()
    finally:
        bar.close()
        cap.release()
        if writer is not None:
            writer.release()
    elapsed = time.perf_counter() - t0
    return {"frames": n, "status": counts, "fps": n / elapsed if elapsed > 0 else 0.0,
            "video": str(video_path), "jsonl": str(lines_path)}
