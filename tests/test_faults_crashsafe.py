"""Crash safety (issue 14, part 3) under real faults: nothing lost, nothing half-written, nothing left behind.

Faults are real wherever the machine allows: SIGTERM / SIGINT / SIGKILL sent to a running ``edge3dfa`` process
at points found by watching its temp folders or its output, a full tmpfs, a tmpfs remounted read-only. Where a
fault must land between two particular system calls (a kill between the two renames of a pair), the child process
sends the signal to itself from a wrapper around that call. Where the machine cannot mount a tmpfs, the disk-full
variant injects ENOSPC into the child's file writes instead, and says so.

Every test asserts the exit code, that stderr holds no traceback, and what is (not) left on disk.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import remove_stale, temp_folder, write_files, write_json
from edge3dfa.manifest import Manifest, manifest_path, publish

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
EDGE3DFA = [PY, "-m", "edge3dfa.cli"]


# ------------------------------------------------------------------------------------------------- helpers

def _python(code: str, *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _cli_script(setup: str, argv: list[str]) -> str:
    """A child running ``edge3dfa.cli.main(argv)`` after ``setup`` (which may patch the CLI or the library)."""
    return f"import sys\nimport edge3dfa.cli as cli\n{setup}\nsys.exit(cli.main({argv!r}))\n"


def _dot_entries(folder: Path) -> list[str]:
    """Names starting with a dot anywhere under ``folder``: temp folders and temp files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")) if folder.exists() else []


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def _manifest(precision: str = "fp32") -> Manifest:
    return Manifest(artifact="", format="onnx", precision=precision, model="mb05", arch="mobilenet_v1",
                    source={"path": "x.pth", "sha256": "0" * 64})


def _publish_bytes(dest: Path, content: bytes) -> None:
    """Publish an artifact of ``content`` (a file, or for .mlpackage a folder holding weight.bin) at ``dest``."""
    with temp_folder(dest.parent, "convert") as work:
        tmp = work / dest.name
        if dest.suffix == ".mlpackage":
            tmp.mkdir()
            (tmp / "weight.bin").write_bytes(content)
        else:
            tmp.write_bytes(content)
        publish(tmp, dest, _manifest())


#: the same helpers for child processes
PUBLISH_HELPERS = ("from __future__ import annotations\nfrom pathlib import Path\n"
                   "from edge3dfa.fileio import temp_folder\nfrom edge3dfa.manifest import Manifest, publish\n"
                   + inspect.getsource(_manifest) + inspect.getsource(_publish_bytes))


def _content(dest: Path) -> bytes:
    return (dest / "weight.bin").read_bytes() if dest.is_dir() else dest.read_bytes()


def _verified(dest: Path) -> bytes:
    """The artifact's content after checking it against its manifest's sha256 (what every reader does)."""
    mpath = manifest_path(dest)
    assert Manifest.read(mpath).check_artifact(mpath) == dest
    return _content(dest)


def _mount_error() -> str | None:
    """Why this machine cannot mount a tmpfs for a test (None: it can)."""
    probe = Path(f"/tmp/edge3dfa-tmpfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True,
                           text=True)
    except FileNotFoundError:
        return "no mount command"
    if r.returncode != 0:
        probe.rmdir()
        return f"mount -t tmpfs failed: {' '.join(r.stderr.split()) or r.returncode} (needs root / CAP_SYS_ADMIN)"
    subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return None


MOUNT_ERROR = _mount_error() if sys.platform.startswith("linux") else "tmpfs mounts are a Linux test"
needs_tmpfs = pytest.mark.skipif(MOUNT_ERROR is not None, reason=f"cannot mount a tmpfs: {MOUNT_ERROR}")


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


#: child-side ENOSPC: every file opened for writing under EDGE3DFA_FULL fails its first write (Python's own file
#: objects; libraries writing from C++ are not reached: the tmpfs variants cover those)
ENOSPC_SETUP = """
import builtins, errno, io, os
_full, _open = os.environ["EDGE3DFA_FULL"], io.open
class _Full:
    def __init__(self, f): self._f = f
    def write(self, *a): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __getattr__(self, k): return getattr(self._f, k)
    def __enter__(self): return self
    def __exit__(self, *a): self._f.close()
def _patched(file, mode="r", *a, **k):
    f = _open(file, mode, *a, **k)
    path = os.path.abspath(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
    return _Full(f) if path.startswith(_full) and any(c in mode for c in "wax+") else f
builtins.open = io.open = _patched
"""


# ------------------------------------------------------------------------------- publish: pairs stay pairs

@pytest.mark.parametrize("suffix", [".onnx", ".mlpackage"])
def test_publish_replaces_a_pair(tmp_path, suffix):
    dest = tmp_path / f"mb05_fp32{suffix}"
    _publish_bytes(dest, b"old")
    _publish_bytes(dest, b"new")
    assert _verified(dest) == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, "mb05_fp32.json"])


@pytest.mark.parametrize("suffix", [".onnx", ".mlpackage"])
def test_publish_that_fails_after_the_artifact_moved_keeps_the_old_pair(tmp_path, monkeypatch, suffix):
    """The manifest's rename fails (EIO) after the new artifact is in place: the old artifact comes back."""
    import edge3dfa.fileio as fileio

    dest = tmp_path / f"mb05_fp32{suffix}"
    _publish_bytes(dest, b"old")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == manifest_path(dest):
            raise OSError(5, "Input/output error", str(src))
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(Edge3dfaError, match=f"cannot write {manifest_path(dest)}: Input/output error"):
        _publish_bytes(dest, b"new")
    monkeypatch.undo()
    assert _verified(dest) == b"old"
    assert _dot_entries(tmp_path) == []


def test_publish_refuses_a_folder_in_the_way_of_the_manifest(tmp_path):
    dest = tmp_path / "mb05_fp32.onnx"
    _publish_bytes(dest, b"old")
    (tmp_path / "elsewhere").mkdir()
    os.replace(manifest_path(dest), tmp_path / "elsewhere" / "kept.json")
    manifest_path(dest).mkdir()
    with pytest.raises(Edge3dfaError, match=f"cannot write {manifest_path(dest)}: a folder is in the way"):
        _publish_bytes(dest, b"new")
    assert dest.read_bytes() == b"old" and _dot_entries(tmp_path) == []


@pytest.mark.parametrize("variant", ["tmpfs", "injected"])
def test_publish_on_a_full_disk_keeps_the_old_pair(tmp_path, variant):
    """The new manifest cannot be written: one error naming it, the old pair intact, no temp left."""
    if variant == "tmpfs" and MOUNT_ERROR:
        pytest.skip(f"cannot mount a tmpfs: {MOUNT_ERROR}")
    folder = tmp_path / "out"
    code = f"""
{PUBLISH_HELPERS}
from edge3dfa.errors import Edge3dfaError
folder = Path({str(folder)!r})
with temp_folder(folder, "convert") as work:
    (work / "new.onnx").write_bytes(b"new")
    if {variant == "tmpfs"!r}:
        with open(folder / "filler", "wb", buffering=0) as f:  # fill the disk
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:
                pass
    else:
        exec({ENOSPC_SETUP!r})
    try:
        publish(work / "new.onnx", folder / "mb05_fp32.onnx", _manifest())
    except Edge3dfaError as e:
        print(e)
"""
    with _tmpfs(folder, "1m") if variant == "tmpfs" else _nothing(folder):
        _publish_bytes(folder / "mb05_fp32.onnx", b"old")
        r = _python(code, env={"EDGE3DFA_FULL": str(folder)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"cannot write {folder / 'mb05_fp32.json'}: No space left on device"
        (folder / "filler").unlink(missing_ok=True)
        assert _verified(folder / "mb05_fp32.onnx") == b"old"
        assert _dot_entries(folder) == []


@contextmanager
def _nothing(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def _chmod_stops_writes() -> bool:
    """False for root (or any process with CAP_DAC_OVERRIDE): a 0o555 folder does not stop its writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        try:
            Path(tmp, "probe").touch()
        except PermissionError:
            return True
        finally:
            os.chmod(tmp, 0o755)
    return False


CHMOD_STOPS_WRITES = _chmod_stops_writes()


def _read_only_variants() -> list:
    return [pytest.param("chmod", marks=pytest.mark.skipif(not CHMOD_STOPS_WRITES, reason=(
                "this process writes into 0o555 folders (root, or CAP_DAC_OVERRIDE): the ro-mount variant "
                "covers read-only folders"))),
            pytest.param("ro-mount", marks=needs_tmpfs)]


@contextmanager
def _read_only_folder(folder: Path, variant: str) -> Iterator[Path]:
    """``folder`` made read-only after the block's set-up: yields, then the caller writes and asserts."""
    if variant == "ro-mount":
        with _tmpfs(folder, "4m"):
            yield folder
    else:
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def _make_read_only(folder: Path, variant: str) -> None:
    _read_only(folder) if variant == "ro-mount" else folder.chmod(0o555)


@pytest.mark.parametrize("variant", _read_only_variants())
def test_publish_into_a_read_only_folder_keeps_the_old_pair(tmp_path, variant):
    folder = tmp_path / "out"
    with _read_only_folder(folder, variant):
        _publish_bytes(folder / "mb05_fp32.onnx", b"old")
        with temp_folder(tmp_path, "convert") as work:
            (work / "new.onnx").write_bytes(b"new")
            _make_read_only(folder, variant)
            with pytest.raises(Edge3dfaError, match=f"cannot write {folder / 'mb05_fp32.onnx'}: "):
                publish(work / "new.onnx", folder / "mb05_fp32.onnx", _manifest())
        assert _verified(folder / "mb05_fp32.onnx") == b"old" and _dot_entries(folder) == []


# a child that publishes OLD then NEW, sending itself SIG when the named step of the second publish happens
KILL_DURING_PUBLISH = PUBLISH_HELPERS.replace("{", "{{").replace("}", "}}") + """
import os, signal, sys
import edge3dfa.fileio as fileio
from edge3dfa.errors import Interrupted, handle_termination
handle_termination()
dest = Path({dest!r})
real_replace, real_rename = os.replace, os.rename
def hit(step):
    if step == {step!r}:
        os.kill(os.getpid(), {sig})
def replace(src, dst):
    real_replace(src, dst)
    hit("artifact renamed" if Path(dst) == dest else "other")
def rename(src, dst):
    real_rename(src, dst)
    hit("old moved aside" if Path(dst).parent.name == "old" else "other")
fileio.os.replace, fileio.os.rename = replace, rename
try:
    _publish_bytes(dest, b"new")
except Interrupted:
    print("interrupted after publish returned", flush=True)
    sys.exit(143)
"""


@pytest.mark.parametrize("suffix, step, after_recovery", [
    (".onnx", "artifact renamed", b"new"),  # after the commit mark: completed
    (".mlpackage", "artifact renamed", b"new"),
    (".mlpackage", "old moved aside", b"old"),  # before it (the old folder was moved aside): undone
])
def test_sigkill_between_renames_is_completed_or_undone_by_remove_stale(tmp_path, suffix, step, after_recovery):
    dest = tmp_path / f"mb05_fp32{suffix}"
    _publish_bytes(dest, b"old")
    r = _python(KILL_DURING_PUBLISH.format(dest=str(dest), step=step,
                                           sig=int(signal.SIGKILL)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    if step == "artifact renamed":  # the state a reader may meet: new artifact, old manifest -> a clear error
        with pytest.raises(Edge3dfaError, match="changed since conversion"):
            _verified(dest)
    else:
        assert not dest.exists()
    stale = _dot_entries(tmp_path)  # the pair's journal, and the work folder the artifact was made in
    assert [s.split(".")[1] for s in stale] == ["convert", dest.name.split(".")[0]], stale
    assert sorted(p.name for p in remove_stale(tmp_path)) == stale
    assert _verified(dest) == after_recovery and _dot_entries(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_the_renames_waits_until_the_pair_is_in_place(tmp_path, sig):
    dest = tmp_path / "mb05_fp32.onnx"
    _publish_bytes(dest, b"old")
    code = KILL_DURING_PUBLISH.format(dest=str(dest), step="artifact renamed",
                                      sig=int(sig)).replace("except Interrupted:", "except (Interrupted, "
                                                                                   "KeyboardInterrupt):")
    r = _python(code)
    assert r.returncode == 143 and r.stdout.strip() == "interrupted after publish returned", r.stderr
    _no_traceback(r.stderr)
    assert _verified(dest) == b"new" and _dot_entries(tmp_path) == []


# ------------------------------------------------------------------------ stale temp folders, and readers

def test_remove_stale_never_touches_a_live_processs_temp_folder(tmp_path):
    live = subprocess.Popen([PY, "-c", f"""
import time
from edge3dfa.fileio import temp_folder
with temp_folder({str(tmp_path)!r}, "convert") as w:
    (w / "half.onnx").write_bytes(b"x")
    print(w.name, flush=True)
    time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        name = live.stdout.readline().strip()
        assert remove_stale(tmp_path) == [] and (tmp_path / name / "half.onnx").exists()
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in remove_stale(tmp_path)] == [name] and _dot_entries(tmp_path) == []


def test_remove_stale_judges_by_lock_pid_and_age(tmp_path):
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".convert.{dead.stdout.strip()}-abcdefgh.tmp"  # its process has exited
    reused = tmp_path / f".convert.{os.getpid()}-abcdefgh.tmp"  # a live PID but no lock: stale once old
    fresh = tmp_path / f".onnx.{os.getpid()}-ijklmnop.tmp"  # a live PID, no lock, just made: maybe being locked
    foreign = [tmp_path / ".git", tmp_path / ".convert-abc123", tmp_path / "convert.1-abcdefgh.tmp"]
    for p in (gone, reused, fresh, *foreign):
        p.mkdir()
    old = time.time() - 3600
    os.utime(reused, (old, old))
    assert sorted(p.name for p in remove_stale(tmp_path)) == sorted([gone.name, reused.name])
    assert fresh.exists() and all(p.exists() for p in foreign)


def test_validate_discovery_ignores_dot_folders_and_temp_files(tmp_path):
    from edge3dfa.validation.harness import discover

    dest = tmp_path / "onnx" / "mb05_fp32.onnx"
    _publish_bytes(dest, b"model")
    work = tmp_path / "onnx" / ".convert.999999-abcdefgh.tmp"  # what a SIGKILLed conversion leaves
    work.mkdir()
    (work / "mb05_int8.onnx").write_bytes(b"half")
    (work / "mb05_int8.json").write_text("{trunc")
    (tmp_path / "onnx" / ".mb05_int8.onnx").write_bytes(b"hidden")
    assert [e.path for e in discover(tmp_path)] == [dest]


def test_atomic_writes_name_the_destination_and_leave_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Edge3dfaError, match=f"cannot write {blocker / 'sub' / 'a.json'}: Not a directory"):
        write_json(blocker / "sub" / "a.json", {})
    (tmp_path / "a.json").mkdir()
    with pytest.raises(Edge3dfaError, match=f"cannot write {tmp_path / 'a.json'}: a folder is in the way"):
        write_json(tmp_path / "a.json", {})
    assert _dot_entries(tmp_path) == []


def test_write_files_replaces_a_set_or_nothing(tmp_path, monkeypatch):
    """A report's files (or an image's JSON + overlay) go together: the third rename fails, the first two are undone."""
    import edge3dfa.fileio as fileio

    names = ["report.json", "report.md", "report.html"]
    write_files(tmp_path, {n: b"old " + n.encode() for n in names})
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "report.html":
            raise OSError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(Edge3dfaError, match=f"cannot write {tmp_path / 'report.html'}: Permission denied"):
        write_files(tmp_path, {n: b"new" for n in names})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {n: b"old " + n.encode() for n in names}
    write_files(tmp_path, {n: b"new" for n in names})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {n: b"new" for n in names}


# ------------------------------------------------------------------------------------ video and camera

#: stand-ins for FaceBoxes and the regressor (the CLI's real code path otherwise): the detector finds one face in
#: the middle, the regressor answers the mean face after FRAME_S seconds (or hangs once HANG frames are written);
#: every frame written is announced on stdout, so the test can signal the child mid-run
VIDEO_CHILD = """
import os, sys, time
import numpy as np
import edge3dfa.cli as cli
import edge3dfa.video as video
from edge3dfa.pipeline import FaceAligner
from edge3dfa.runtime.detect import prior_boxes
from edge3dfa.target import Target

class Detector(Target):
    runtime = "stub"
    def __init__(self):
        super().__init__(None)
        self.input_shape = (3, None, None)
    def _run(self, x):
        h, w = x.shape[2:]
        pri = prior_boxes(h, w)
        conf = np.tile(np.float32([1, 0]), (1, len(pri), 1))
        k = np.argmin(np.abs(pri[:, 0] - 0.5) + np.abs(pri[:, 1] - 0.5) + 9 * (np.round(pri[:, 2] * w) != 32))
        conf[0, k] = (0.01, 0.99)
        return [np.zeros((1, len(pri), 4), np.float32), conf]

class SlowMeanFace(Target):
    runtime = "stub"
    written = 0
    def _run(self, x):
        time.sleep(3600 if SlowMeanFace.written == {hang} else {frame_s})
        return [np.zeros((len(x), 62), np.float32)]

aligner = FaceAligner(SlowMeanFace(None), Detector())
cli.open_aligner = lambda *a, **k: aligner
real_add = video._Recorder.add
def add(self, *a):
    real_add(self, *a)
    SlowMeanFace.written = self.frames
    print("frame", self.frames, flush=True)
video._Recorder.add = add
real_capture = video.cv2.VideoCapture
video.cv2.VideoCapture = lambda s: real_capture({clip!r}) if s == 0 else real_capture(s)  # camera 0 plays the clip
{setup}
sys.exit(cli.main({argv!r}))
"""
W, H = 160, 120


def _clip(path: Path, frames: int) -> Path:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    bg = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 3)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (W, H))
    for i in range(frames):
        w.write(np.roll(bg, i, axis=1))
    w.release()
    return path


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    return _clip(tmp_path_factory.mktemp("clip") / "clip.mp4", 150)


def _video_child(clip: Path, argv: list[str], *, hang: int = -1, frame_s: float = 0.02, setup: str = "",
                 **kw) -> subprocess.Popen:
    code = VIDEO_CHILD.format(clip=str(clip), argv=["run", *argv, "--probe", "0"], hang=hang, frame_s=frame_s,
                              setup=setup)
    return subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_frame(child: subprocess.Popen, n: int, timeout: float = 120) -> None:
    """Read the child's stdout until it has written ``n`` frames (killed if that takes over ``timeout`` s)."""
    import threading

    watchdog = threading.Timer(timeout, child.kill)
    watchdog.start()
    try:
        for line in child.stdout:
            if line.strip() == f"frame {n}":
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"the child ended before frame {n}: {child.stderr.read()}")


def _check_pair(video: Path, lines: Path) -> int:
    """The mp4 opens and holds as many frames as the JSONL has lines, every line parses, frames count from 0."""
    import cv2

    records = [json.loads(s) for s in lines.read_text().splitlines()]
    cap = cv2.VideoCapture(str(video))
    assert cap.isOpened(), video
    count, decoded = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0
    while cap.read()[0]:
        decoded += 1
    assert count == decoded == len(records) > 0
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert all(len(r["faces"]) == 1 and len(r["faces"][0]["landmarks"]) == 68 for r in records)
    return len(records)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_video_file_keeps_a_playable_partial_pair(tmp_path, long_clip, sig, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip_overlay.mp4").write_bytes(b"an earlier complete result")
    (out / "clip.jsonl").write_text("{}\n")
    child = _video_child(long_clip, [str(long_clip), "--out-dir", str(out)])
    _wait_for_frame(child, 5)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    _no_traceback(err)
    n = _check_pair(out / "clip_overlay.partial.mp4", out / "clip.partial.jsonl")
    assert 5 <= n < 150
    assert f"interrupted after {n} frames; kept {out / 'clip_overlay.partial.mp4'}" in err
    assert err.strip().splitlines()[-1].startswith("edge3dfa: interrupted")
    assert (out / "clip_overlay.mp4").read_bytes() == b"an earlier complete result"  # not replaced by a part
    assert _dot_entries(out) == []
    if sig == signal.SIGTERM:  # a complete run then replaces the earlier result and drops the partial pair
        child = _video_child(long_clip, [str(long_clip), "--out-dir", str(out)], frame_s=0)
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert _check_pair(out / "clip_overlay.mp4", out / "clip.jsonl") == 150
        assert sorted(p.name for p in out.iterdir()) == ["clip.jsonl", "clip_overlay.mp4"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 0), (signal.SIGTERM, 143), (None, 0)])
def test_camera_run_keeps_its_outputs_when_stopped(tmp_path, long_clip, sig, code):
    """Ctrl-C is how a camera run ends (exit 0); SIGTERM ends it too (143); a camera that stops sending frames
    ends it normally. Each keeps camera0_overlay.mp4 + camera0.jsonl for the frames seen."""
    out = tmp_path / "out"
    clip = long_clip if sig else _clip(tmp_path / "short.mp4", 12)
    child = _video_child(clip, ["--camera", "0", "--out-dir", str(out)])
    if sig:
        _wait_for_frame(child, 5)
        child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    _no_traceback(err)
    n = _check_pair(out / "camera0_overlay.mp4", out / "camera0.jsonl")
    assert n == 12 if sig is None else 5 <= n < 150
    assert sorted(p.name for p in out.iterdir()) == ["camera0.jsonl", "camera0_overlay.mp4"]


def test_a_second_signal_stops_a_stuck_frame_and_still_keeps_the_frames_so_far(tmp_path, long_clip):
    out = tmp_path / "out"
    child = _video_child(long_clip, [str(long_clip), "--out-dir", str(out)], hang=6)  # the 7th frame never comes
    _wait_for_frame(child, 6)
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)  # recorded: the run would stop after the frame in hand, which hangs
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)  # so the second one stops it at once
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    _no_traceback(err)
    assert _check_pair(out / "clip_overlay.partial.mp4", out / "clip.partial.jsonl") == 6
    assert _dot_entries(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_signal_the_parent_ignores_stays_ignored(tmp_path, long_clip, sig):
    """``nohup edge3dfa ...`` ignores SIGHUP and a script's ``edge3dfa ... &`` SIGINT: the person asked for the
    run to go on. Handlers installed over SIG_IGN stopped it (129 / a cut-short video); the run ends whole."""
    out = tmp_path / "out"
    child = _video_child(long_clip, [str(long_clip), "--out-dir", str(out)],
                         preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
    _wait_for_frame(child, 5)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    _no_traceback(err)
    assert _check_pair(out / "clip_overlay.mp4", out / "clip.jsonl") == 150
    assert sorted(p.name for p in out.iterdir()) == ["clip.jsonl", "clip_overlay.mp4"]


@pytest.mark.parametrize("variant", ["tmpfs", "injected", "read-only"])
def test_video_on_a_full_or_read_only_disk_is_one_line_exit_2(tmp_path, long_clip, variant):
    if variant in ("tmpfs", "read-only") and MOUNT_ERROR:
        pytest.skip(f"cannot mount a tmpfs: {MOUNT_ERROR}")
    out = tmp_path / "out"
    with _tmpfs(out, "256k") if variant != "injected" else _nothing(out):
        if variant == "read-only":
            _read_only(out)
        child = _video_child(long_clip, [str(long_clip), "--out-dir", str(out)], frame_s=0,
                             setup=ENOSPC_SETUP if variant == "injected" else "", env={**os.environ,
                                                                                        "EDGE3DFA_FULL": str(out)})
        _, err = child.communicate(timeout=120)
        assert child.returncode == 2, err
        _no_traceback(err)
        lines = [s for s in err.strip().splitlines() if "frame/s" not in s]  # the progress bar aside: one line
        assert len(lines) == 1 and lines[0].startswith(f"edge3dfa: error: cannot write {out}/clip"), err
        assert ".tmp" not in lines[0]
        assert {"tmpfs": "No space left on device" in err or "frames" in err, "read-only": "Read-only" in err,
                "injected": "No space left on device" in err}[variant], err
        assert list(out.iterdir()) == []


# ------------------------------------------------------------------- real conversions: kill, re-convert, validate

def _convert(out: Path, to: str, precision: str, log: Path, *extra: str) -> subprocess.Popen:
    """``edge3dfa convert`` of mb05 in a child; stderr goes to ``log`` (a pipe nobody reads could fill up)."""
    args = [*EDGE3DFA, "convert", "--model", "mb05", "--to", to, "--precision", precision, "--out", str(out),
            "--threads", "1", "--calib-count", "32", *extra]
    with open(log, "w") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, text=True)


def _temps(folder: Path) -> list[Path]:
    from edge3dfa.fileio import TEMP_NAME

    return [p for p in folder.iterdir() if TEMP_NAME.match(p.name)] if folder.is_dir() else []


def _working(folder: Path) -> bool:
    """A conversion is under way in ``folder``: one of its temp folders already holds a file."""
    return any(f.is_file() for t in _temps(folder) for f in t.rglob("*"))


def _signal_when(child: subprocess.Popen, ready, sig: int, log: Path, timeout: float = 600) -> str:
    """Poll (10 ms) until ``ready()``, send ``sig``, wait; returns the child's stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert child.poll() is None, f"the conversion ended before the kill point: {log.read_text()}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    child.send_signal(sig)
    child.wait(timeout=300)
    return log.read_text()


def _pairs(folder: Path) -> list[str]:
    """The artifacts in ``folder`` after checking each against its manifest (sha256); no other entry allowed."""
    names = sorted(p.name for p in folder.iterdir())
    artifacts = sorted(n for n in names if not n.endswith(".json"))
    assert names == sorted(artifacts + [manifest_path(folder / a).name for a in artifacts]), names
    for a in artifacts:
        _verified(folder / a)
    return artifacts


@pytest.fixture(scope="module")
def killed_then_reconverted(tmp_path_factory) -> Path:
    """mb05 converted into OUT after SIGTERM and SIGKILL at several points of real ONNX and TFLite conversions."""
    out, logs = tmp_path_factory.mktemp("convert"), tmp_path_factory.mktemp("logs")
    onnx, tflite = out / "mb05" / "onnx", out / "mb05" / "tflite"
    # 1. SIGTERM while fp32 is being exported: cleaned up, nothing published
    child = _convert(out, "onnx", "fp32,int8", logs / "1.txt")
    err = _signal_when(child, lambda: _working(onnx), signal.SIGTERM, logs / "1.txt")
    assert child.returncode == 143, err
    _no_traceback(err)
    assert err.strip().splitlines()[-1] == "edge3dfa: interrupted (SIGTERM)"
    assert list(onnx.iterdir()) == []
    # 2. SIGKILL in the int8 stage, fp32 already published: fp32 stays a complete pair, a stale temp folder stays
    child = _convert(out, "onnx", "fp32,int8", logs / "2.txt")
    err = _signal_when(child, lambda: "onnx int8" in (logs / "2.txt").read_text() and _working(onnx),
                       signal.SIGKILL, logs / "2.txt")
    assert child.returncode == -signal.SIGKILL, err
    _no_traceback(err)
    stale = _temps(onnx)
    assert len(stale) == 1 and stale[0].name.startswith(f".convert.{child.pid}-")
    assert (onnx / "mb05_fp32.onnx").exists() and not (onnx / "mb05_int8.onnx").exists()
    # 3. SIGKILL during a TFLite conversion
    child = _convert(out, "tflite", "fp32", logs / "3.txt")
    err = _signal_when(child, lambda: bool(_temps(tflite)), signal.SIGKILL, logs / "3.txt")
    assert child.returncode == -signal.SIGKILL, err
    _no_traceback(err)
    assert [p.name.split(".")[1] for p in tflite.iterdir()] == ["convert"]
    # 4. convert again into the same folders: stale temps go, complete pairs come
    for n, (fmt, precisions) in enumerate([("onnx", "fp32,int8"), ("tflite", "fp32")], 4):
        child = _convert(out, fmt, precisions, logs / f"{n}.txt")
        child.wait(timeout=900)
        err = (logs / f"{n}.txt").read_text()
        assert child.returncode == 0, err
        _no_traceback(err)
        assert "left by an interrupted run" in err
    return out / "mb05"


@pytest.mark.slow
def test_killed_conversions_leave_only_complete_pairs_after_reconverting(killed_then_reconverted):
    mb05 = killed_then_reconverted
    assert _pairs(mb05 / "onnx") == ["mb05_fp32.onnx", "mb05_int8.onnx"]
    assert _pairs(mb05 / "tflite") == ["mb05_fp32.tflite"]
    assert _dot_entries(mb05) == []


@pytest.mark.slow
def test_validate_passes_on_the_reconverted_folder(killed_then_reconverted, tmp_path):
    r = subprocess.run([*EDGE3DFA, "validate", str(killed_then_reconverted), "--samples", "200",
                        "--latency-runs", "0", "--threads", "1", "--report-dir", str(tmp_path / "report")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    _no_traceback(r.stderr)
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["targets"]
    scored = {os.path.basename(t["artifact"]): t["status"] for t in rows if t["role"] == "artifact"}
    assert scored == {"mb05_fp32.onnx": "ok", "mb05_int8.onnx": "ok", "mb05_fp32.tflite": "ok"}, scored
    assert sorted(p.name for p in (tmp_path / "report").iterdir() if p.suffix != ".png") == \
        ["report.html", "report.json", "report.md"]
    assert _dot_entries(tmp_path / "report") == []
    # the same report into a read-only folder: one error naming a report file, nothing written
    from edge3dfa.validation import report

    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    for variant in ("ro-mount", "chmod"):
        if (variant == "ro-mount" and MOUNT_ERROR) or (variant == "chmod" and not CHMOD_STOPS_WRITES):
            continue  # root ignores chmod; without mounts only chmod can be tried
        folder = tmp_path / variant
        with _read_only_folder(folder, variant):
            _make_read_only(folder, variant)
            with pytest.raises(Edge3dfaError, match=f"cannot write {folder}/report"):
                report.write(rep, folder)
            assert list(folder.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tmpfs", "injected"])
def test_convert_on_a_full_disk_is_one_line_exit_2_naming_the_artifact(tmp_path, variant):
    """tmpfs: 5 MiB holds the exported graph but not onnxruntime's optimised copy, which fails with no OSError
    ("Protobuf serialization failed"); injected: the first Python-level write fails."""
    if variant == "tmpfs" and MOUNT_ERROR:
        pytest.skip(f"cannot mount a tmpfs: {MOUNT_ERROR}")
    out = tmp_path / "out"
    with _tmpfs(out, "5m") if variant == "tmpfs" else _nothing(out):
        code = _cli_script(ENOSPC_SETUP if variant == "injected" else "",
                           ["convert", "--model", "mb05", "--to", "onnx", "--out", str(out), "--threads", "1"])
        r = _python(code, env={"EDGE3DFA_FULL": str(out)}, timeout=600)
        assert r.returncode == 2, r.stderr
        _no_traceback(r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"edge3dfa: error: cannot write {out / 'mb05' / 'onnx' / 'mb05_fp32.onnx'}: "
                               "No space left on device"), r.stderr
        assert [p for p in (out / "mb05" / "onnx").rglob("*")] == []


@pytest.mark.parametrize("variant", _read_only_variants())
def test_convert_into_a_read_only_folder_is_one_line_exit_2_naming_the_artifact(tmp_path, variant):
    out = tmp_path / "out"
    with _read_only_folder(out, variant):
        (out / "mb05" / "onnx").mkdir(parents=True)
        (out / "mb05" / "onnx" / "kept.txt").write_text("old")
        _make_read_only(out / "mb05" / "onnx" if variant == "chmod" else out, variant)
        r = subprocess.run([*EDGE3DFA, "convert", "--model", "mb05", "--to", "onnx", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        _no_traceback(r.stderr)
        assert r.stderr.strip().splitlines()[-1] == \
            f"edge3dfa: error: cannot write {out / 'mb05' / 'onnx' / 'mb05_fp32.onnx'}: " + \
            ("Read-only file system" if variant == "ro-mount" else "Permission denied")
        assert [p.name for p in (out / "mb05" / "onnx").iterdir()] == ["kept.txt"]
