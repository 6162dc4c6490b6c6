"""What ``edge3dfa run`` reads and the files it writes for each input, decided before any work starts.

Output names: an input's outputs are named after its file name without the suffix (``photo.jpg`` ->
``photo.json`` + ``photo_overlay.png``; ``clip.mp4`` -> ``clip.jsonl`` + ``clip_overlay.mp4``). When two inputs
of one run would write the same file (``face.jpg`` and ``face.png`` in one folder), the outputs of both keep
their suffix (``face_jpg.json``, ``face_png.json``): each name still says which input it came from, and the
names depend only on the inputs of the run, not on their order. Inputs that still clash after that (``p.jpg``
from two folders into one ``--out-dir``) stop the run before anything is read, naming both: there is no name
a person could guess, and silently writing one over the other loses a result. Names are compared ignoring
case, since macOS and Windows disks do.

An image's files (meshes, overlay, then the JSON) are written together (``fileio.write_files``): all of them or
none, and a failure leaves what was there before.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Job:
    """One input of a run and where its outputs go: ``stem`` + ``.json`` / ``_overlay.png`` (images) or
    ``.jsonl`` / ``_overlay.mp4`` (videos, cameras)."""

    source: Path | int  # image or video file, or camera index
    kind: str  # image | video | camera
    stem: Path  # OUT_DIR / NAME

    @property
    def outputs(self) -> tuple[Path, Path]:
        if self.kind == "image":
            return Path(f"{self.stem}.json"), Path(f"{self.stem}_overlay.png")
        return Path(f"{self.stem}.jsonl"), Path(f"{self.stem}_overlay.mp4")

    @property
    def label(self) -> str:
        """The input as printable text (camera N, or the file name with non-UTF-8 bytes as \\xNN)."""
        return f"camera {self.source}" if self.kind == "camera" else printable(self.source)


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files and the images of folders (sorted by name; hidden files and earlier ``*_overlay`` outputs
    skipped), without duplicates (a file given twice, or a folder and a file in it)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith(".") and not p.stem.endswith("_overlay") and p.is_file())
            if not found:
                raise Edge3dfaError(f"no images in folder {printable(item)}")
            out += found
        elif item.is_file():
            out.append(item)
        elif item.exists():  # a device or pipe (/dev/zero would be read forever)
            raise Edge3dfaError(f"not an image file or a folder: {printable(item)}")
        else:
            raise Edge3dfaError(f"no such file or folder: {printable(item)}")
    return _unique(out)


def plan(inputs: Sequence[str], out_dir: str | None = None, camera: int | None = None) -> list[Job]:
    """Every input of ``edge3dfa run`` as a Job with its output names: images first (in the order given,
    folders sorted), then videos, then the camera. Raises Edge3dfaError for a missing input, a bad camera
    index or outputs that would overwrite each other or an input."""
    from edge3dfa.video import VIDEO_SUFFIXES, check_camera_index

    videos = [Path(p) for p in inputs if Path(p).suffix.lower() in VIDEO_SUFFIXES]
    for v in videos:
        if not v.is_file():
            raise Edge3dfaError(f"no such video file: {printable(v)}")
    images = list_images([p for p in inputs if Path(p).suffix.lower() not in VIDEO_SUFFIXES])
    where = Path(out_dir) if out_dir else None
    jobs = [Job(p, "image", (where or p.parent) / p.stem) for p in images]
    jobs += [Job(v, "video", (where or v.parent) / v.stem) for v in _unique(videos)]
    if camera is not None:
        check_camera_index(camera)
        jobs.append(Job(camera, "camera", (where or Path.cwd()) / f"camera{camera}"))
    return _name_outputs(jobs)


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path)).casefold()


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    return [p for p in paths if not (_key(p) in seen or seen.add(_key(p)))]


def _clashes(jobs: list[Job]) -> dict[str, list[int]]:
    """Output file -> the jobs that would write it, for files more than one job writes."""
    writers: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        for out in job.outputs:
            writers[_key(out)].append(i)
    return {k: v for k, v in writers.items() if len(v) > 1}


def _name_outputs(jobs: list[Job]) -> list[Job]:
    """Clashing jobs keep their suffix in their outputs' names; refuse what still clashes."""
    clashing = sorted({i for ids in _clashes(jobs).values() for i in ids})
    named = list(jobs)
    for i in clashing:
        job = jobs[i]
        if isinstance(job.source, Path) and job.source.suffix:
            named[i] = replace(job, stem=job.stem.with_name(f"{job.stem.name}_{job.source.suffix[1:]}"))
    for out, ids in _clashes(named).items():
        a, b = (jobs[i] for i in ids[:2])
        k = [_key(o) for o in named[ids[0]].outputs].index(out)
        same = _key(a.outputs[k]) == _key(b.outputs[k])  # then say the name the user expects, not the suffixed one
        name = a.outputs[k] if same else named[ids[0]].outputs[k]
        raise Edge3dfaError(f"{a.label} and {b.label} would both write {printable(name)}: rename one, or run "
                            "them with different --out-dir")
    inputs = {_key(j.source): j for j in named if isinstance(j.source, Path)}
    for job in named:
        for out in job.outputs:
            if _key(out) in inputs:
                raise Edge3dfaError(f"the output {printable(out)} of {job.label} would overwrite the input "
                                    f"{inputs[_key(out)].label}: rename it, or use --out-dir")
    if clashing:
        names = ", ".join(f"{named[i].label} -> {printable(named[i].outputs[0].name)}" for i in clashing)
        print(f"note: inputs with the same name keep their suffix in their outputs' names: {names}",
              file=sys.stderr)
    return named
