"""Writing files so that nothing is lost or half-written, and cleaning up after a process that was killed.

Every write goes into a temp folder beside its destination, ``.LABEL.PID-XXXXXXXX.tmp``, on which its owner holds
an exclusive ``flock`` while it runs (the kernel drops the lock when the owner dies, even by SIGKILL); finished
files are flushed to disk (fsync) and renamed into place. A temp folder is *stale* when its lock is free and its
owner process (the PID in its name) is gone, or the lock is free and it is older than ``STALE_AFTER_S`` (the PID
was reused); ``remove_stale`` finishes or undoes what a stale one holds, then deletes it. A live process's temp
folder is never touched (where the file system has no flock, e.g. some network mounts, the PID alone decides: a
process of another PID namespace sharing the folder could then look gone; on Windows nothing is removed).
Readers (``validate``) skip every entry whose name starts with a dot.

``replace_together`` moves several files or folders into one folder as a set (a model and its manifest, a video
and its JSON lines). Two renames cannot be atomic together, so it journals them in the temp folder: the new
entries, the names, a link to (or the moved-away) old entries, then a ``commit`` mark, then the renames.
SIGINT/SIGTERM/SIGHUP are held back during all of it (``DeferredInterrupts``). What a reader can see:

* after it returns: the new set; after it raises (disk full, permission denied, read-only folder, a folder in
  the way...): the old set (or no entry where there was none), the error naming the destination, no temp left;
* while it runs (microseconds between renames): some entries old and some new, or an entry missing; a reader
  that checks a manifest's sha256 gets a clear mismatch, never a pair that verifies but does not belong together;
* after SIGKILL or a power cut during the renames: that same mixed state, until the next ``remove_stale`` of the
  folder (``convert`` runs it) completes the set from the journal (the new set; before the ``commit`` mark, the
  old one). Two processes replacing the same set at once are not ordered: the last rename of each name wins.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edge3dfa.errors import DeferredInterrupts, Edge3dfaError

#: every temp folder edge3dfa creates; LABEL names what it is for (``convert``, ``mb05_int8.onnx``, ...)
TEMP_NAME = re.compile(r"^\.(?P<label>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
#: a temp folder whose lock is free but whose PID runs (a reused PID) is stale after this long
STALE_AFTER_S = 60.0
_NEW, _OLD, _PLAN, _COMMIT = "new", "old", "plan.json", "commit"


@contextmanager
def temp_folder(parent: str | os.PathLike, label: str, dest: str | os.PathLike | None = None) -> Iterator[Path]:
    """A locked work folder ``.LABEL.PID-XXXXXXXX.tmp`` in ``parent``, removed with all it holds on exit (unless it
    holds the journal of an unfinished ``replace_together``, which ``remove_stale`` then completes or undoes).

    A folder that cannot be created is an Edge3dfaError naming ``dest`` (what the caller is writing) or ``parent``.
    Some libraries fail on a full disk without an OSError (onnxruntime saving a model: "Protobuf serialization
    failed"): an exception leaving the block while the disk has less free space than the largest file in the
    folder (or under 1 MiB) becomes OSError(ENOSPC) about ``dest``, checked before the folder is removed.
    """
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{label}.{os.getpid()}-", suffix=".tmp", dir=parent))
    except OSError as e:
        raise Edge3dfaError(f"cannot write {dest or parent}: {e.strerror or e}") from e
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY)
        _try_lock(fd)
        yield path
    except Exception as e:
        if isinstance(e, (Edge3dfaError, OSError)) or not _disk_full(path):
            raise
        from edge3dfa.logs import one_line  # a library that fails on a full disk without saying so

        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(e).__name__}: {one_line(e, 120)})",
                      str(dest or path)) from e
    finally:
        if not (path / _PLAN).exists():
            shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


@contextmanager
def write_errors(dests: Sequence[str | os.PathLike], work: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError about a temp path under ``work`` (or about no path: a failed write) as an
    Edge3dfaError naming the destination it was for (``dests[0]`` unless the temp has a destination's name)."""
    try:
        yield
    except OSError as e:
        where = _destination(e.filename, [Path(d) for d in dests], Path(work))
        if where is None:
            raise  # about another file (an input, say): main() names it
        raise Edge3dfaError(f"cannot write {where}: {e.strerror or e}") from e


def _disk_full(work: Path) -> bool:
    try:
        free = shutil.disk_usage(work).free
        largest = max((f.stat().st_size for f in work.rglob("*") if f.is_file()), default=0)
    except OSError:
        return False
    return free < max(largest, 1 << 20)


def _destination(filename: Any, dests: list[Path], work: Path) -> Path | None:
    if filename is None:
        return dests[0]
    p, work = Path(os.path.abspath(os.fsdecode(filename))), Path(os.path.abspath(work))
    named = [d for d in dests if Path(os.path.abspath(d)) == p]
    if named:
        return named[0]
    if not p.is_relative_to(work):
        return None
    return next((d for d in dests if d.name in p.relative_to(work).parts), dests[0])


@contextmanager
def atomic_paths(*dests: str | os.PathLike) -> Iterator[list[Path]]:
    """Temp paths for ``dests`` (one folder; each temp keeps its destination's name, so writers that go by the
    suffix work); when the block succeeds they replace the destinations together (``replace_together``), when
    it fails or is interrupted they are removed. Write errors name the destination, not the temp."""
    paths = [Path(d) for d in dests]
    folder = _one_folder(paths)
    with temp_folder(folder, paths[0].name, dest=paths[0]) as work, write_errors(paths, work):
        (work / _NEW).mkdir()
        temps = [work / _NEW / p.name for p in paths]
        yield temps
        _replace_staged(work, folder, [p.name for p in paths])


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path for ``dest``; on success it is flushed and renamed onto ``dest``, on error removed."""
    with atomic_paths(dest) as (tmp,):
        yield tmp


def replace_together(moves: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Move each (source, destination) into place as one set (see the module docstring for what readers see).

    Destinations share one folder; sources are on its filesystem (e.g. in a ``temp_folder`` beside it) and are
    moved, not copied. A destination folder (a .mlpackage) is replaced whole.
    """
    dests = [Path(d) for _, d in moves]
    folder = _one_folder(dests)
    with temp_folder(folder, dests[0].name, dest=dests[0]) as work, write_errors(dests, work):
        (work / _NEW).mkdir()
        for src, dest in moves:
            os.rename(src, work / _NEW / dest.name)
        _replace_staged(work, folder, [d.name for d in dests])


def _one_folder(paths: list[Path]) -> Path:
    folders = {p.parent for p in paths}
    if len(folders) != 1 or len({p.name for p in paths}) != len(paths):
        raise ValueError(f"destinations must be distinct names in one folder: {paths}")
    return folders.pop()


def _replace_staged(work: Path, folder: Path, names: list[str]) -> None:
    """Journal, then rename ``work/new/NAME`` onto ``folder/NAME`` for every name, with signals held back."""
    for name in names:
        new, dest = work / _NEW / name, folder / name
        if not new.exists():
            raise Edge3dfaError(f"cannot write {dest}: nothing was written")
        if dest.exists() and dest.is_dir() != new.is_dir():
            raise Edge3dfaError(f"cannot write {dest}: a {'folder' if dest.is_dir() else 'file'} is in the way")
        _fsync(new)
    if len(names) == 1 and not (folder / names[0]).is_dir():  # one file: a single rename is atomic already
        os.replace(work / _NEW / names[0], folder / names[0])
    else:
        with DeferredInterrupts():
            try:
                _write_journal(work, folder, names)
                for name in names:
                    os.replace(work / _NEW / name, folder / name)
            except OSError:
                _roll_back(work, folder, names)  # should this fail too, the journal stays for remove_stale
                (work / _PLAN).unlink()
                raise
            (work / _PLAN).unlink()  # done: the journal is spent
    _fsync_dir(folder)


def _write_journal(work: Path, folder: Path, names: list[str]) -> None:
    """The plan, the old entries kept aside (a hard link for a file where possible, else moved), the commit mark."""
    (work / _PLAN).write_text(json.dumps(names))
    (work / _OLD).mkdir()
    for name in names:
        dest = folder / name
        if not os.path.lexists(dest):
            continue
        if dest.is_file() and not dest.is_symlink():
            try:
                os.link(dest, work / _OLD / name)
                continue
            except OSError:
                pass  # no hard links here (FAT, some network file systems): move it aside
        os.rename(dest, work / _OLD / name)
    _fsync_dir(work / _OLD)
    (work / _COMMIT).touch()
    _fsync_dir(work)


def _roll_forward(work: Path, folder: Path, names: list[str]) -> None:
    for name in names:
        new, dest = work / _NEW / name, folder / name
        if os.path.lexists(new):
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # the old one is in work/old
            os.replace(new, dest)


def _roll_back(work: Path, folder: Path, names: list[str]) -> None:
    """Put every old entry back; remove a new one that had no old one. Idempotent, so a crash here is recoverable."""
    with suppress(FileNotFoundError):
        (work / _COMMIT).unlink()
    for name in names:
        old, new, dest = work / _OLD / name, work / _NEW / name, folder / name
        if os.path.lexists(old) and not _same(old, dest):  # (a hard link of an untouched file needs nothing)
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(old, dest)
        elif not os.path.lexists(new) and os.path.lexists(dest):  # it was renamed in and had no predecessor
            shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _recover(work: Path, folder: Path) -> None:
    """Finish (after the commit mark) or undo (before it) the renames a dead process journalled in ``work``."""
    try:
        names = json.loads((work / _PLAN).read_text())
    except (OSError, ValueError):
        return  # no journal: nothing was renamed yet
    if not (isinstance(names, list) and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                            for n in names)):
        return
    if (work / _COMMIT).exists():
        _roll_forward(work, folder, names)
    else:
        _roll_back(work, folder, names)
    _fsync_dir(folder)


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Complete or undo, then delete, the temp folders in ``folder`` whose owner is gone; returns what was removed.

    Best effort: an entry that cannot be handled (no permission) is left alone; it never holds a live process's
    work. Only names matching ``TEMP_NAME`` are looked at.
    """
    folder = Path(folder)
    try:
        entries = [e for e in os.scandir(folder) if TEMP_NAME.match(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = Path(entry.path)
        fd = _claim_if_stale(path, int(TEMP_NAME.match(entry.name)["pid"]))
        if fd is None:
            continue
        try:
            with DeferredInterrupts():
                _recover(path, folder)
                shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _claim_if_stale(path: Path, pid: int) -> int | None:
    """An open, locked descriptor of temp folder ``path`` if its owner is gone, else None (and nothing held)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        age = time.time() - os.fstat(fd).st_mtime
    except OSError:
        return None
    locked = _try_lock(fd)
    stale = locked is not False and (not _alive(pid) or (locked is True and age > STALE_AFTER_S))
    if not stale:
        os.close(fd)
        return None
    return fd


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True taken, False another process holds it, None unsupported."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None  # ENOLCK, EOPNOTSUPP: a file system without flock; the PID alone decides
    return True


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it; without a way to ask, keep the folder
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, under another user
    return True


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder artifact and the folder, to disk."""
    if path.is_dir() and not path.is_symlink():
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.is_symlink():
                _fsync(f)
        _fsync_dir(path)
    elif path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def write_files(folder: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write ``{name: bytes}`` into ``folder`` as one set (``replace_together``): e.g. an image's JSON and its
    overlay (``cv2.imencode`` gives the bytes), or a report's JSON, Markdown, HTML and plots. Returns the paths."""
    dests = [Path(folder) / name for name in files]
    with atomic_paths(*dests) as temps:
        for tmp, data in zip(temps, files.values()):
            try:
                tmp.write_bytes(data)
            except OSError as e:  # a failed write names no file: say which
                raise Edge3dfaError(f"cannot write {Path(folder) / tmp.name}: {e.strerror or e}") from e
    return dests


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    dest = Path(dest)
    return write_files(dest.parent, {dest.name: data})[0]


def write_text(dest: str | os.PathLike, text: str) -> Path:
    return write_bytes(dest, text.encode())


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every edge3dfa file uses (numpy arrays and scalars, paths allowed)."""
    return json.dumps(obj, indent=2, default=_jsonable) + "\n"


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    return write_text(dest, json_text(obj))


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
