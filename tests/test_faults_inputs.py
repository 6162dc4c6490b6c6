"""Issue 14, inputs: bad or awkward inputs get one line and an exit code, never a crash, a lost output or a
calibration set that overlaps the evaluation set.

Everything that could crash runs the real CLI in a subprocess (a segfault there is exit 139, not a dead test
run) and asserts the exit code, the absence of a traceback and what is (not) left on disk. References are
independent of the code under test: the known face counts of the upstream example photos, the same photo
upright, numpy min/max of the calibration data, pixel differences computed here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge3dfa import assets

PY = sys.executable
EXAMPLES = {"JianzhuGuo": 1, "trump_hillary": 2, "emma": 3}  # faces in the upstream example photos


def cli(*args: str | bytes | os.PathLike, code: str = "", env: dict | None = None, timeout: int = 300,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``edge3dfa ARGS`` in a fresh interpreter (after ``code``, which may inject a fault); args may be bytes."""
    argv = [os.fsdecode(a) for a in args]
    script = f"import sys\nimport edge3dfa.cli as cli\n{code}\nsys.exit(cli.main({argv!r}))\n"
    return subprocess.run([PY, "-c", script], capture_output=True, env={**os.environ, **(env or {})},
                          timeout=timeout, cwd=cwd)


def err_lines(r: subprocess.CompletedProcess) -> list[str]:
    text = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ln.strip()]


def photo(name: str) -> np.ndarray:
    return cv2.imread(str(assets.fetch(name)))


def write(path: Path | bytes, img: np.ndarray, ext: str = ".jpg", **params: int) -> None:
    flags = [cv2.IMWRITE_JPEG_QUALITY, params["quality"]] if "quality" in params else []
    data = cv2.imencode(ext, img, flags)[1].tobytes()
    with open(path, "wb") as f:
        f.write(data)


def faces_in(path: Path) -> int:
    return len(json.loads(path.read_text())["faces"])


def listing(folder: Path) -> list[str]:
    return sorted(os.fsdecode(n) for n in os.listdir(os.fsencode(folder)))


def non_utf8_dir(tmp_path: Path) -> Path:
    """A folder whose file system takes non-UTF-8 names (Linux does; macOS APFS does not)."""
    probe = os.path.join(os.fsencode(tmp_path), b"probe\xe9")
    try:
        open(probe, "wb").close()
        os.unlink(probe)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 file names")
    return tmp_path


# ------------------------------------------------------------------------------------------- output names
#: ``run`` with the defaults: the PyTorch mb05 regressor and FaceBoxes detector
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")


@needs_torch
def test_same_stem_images_keep_their_suffix_and_both_results(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "face.jpg", photo("JianzhuGuo"))
    write(folder / "face.png", photo("trump_hillary"), ".png")
    r = cli("run", folder)
    assert r.returncode == 0, err_lines(r)
    assert faces_in(folder / "face_jpg.json") == EXAMPLES["JianzhuGuo"]
    assert faces_in(folder / "face_png.json") == EXAMPLES["trump_hillary"]
    for stem, src in (("face_jpg", "JianzhuGuo"), ("face_png", "trump_hillary")):
        overlay = cv2.imread(str(folder / f"{stem}_overlay.png"))
        assert overlay.shape == photo(src).shape
        assert json.loads((folder / f"{stem}.json").read_text())["image"].endswith(stem.replace("_", "."))
    assert not (folder / "face.json").exists() and not (folder / "face_overlay.png").exists()
    assert listing(folder) == ["face.jpg", "face.png", "face_jpg.json", "face_jpg_overlay.png", "face_png.json",
                               "face_png_overlay.png"]


def test_same_name_from_two_folders_is_refused_before_any_work(tmp_path):
    for sub, name in (("a", "JianzhuGuo"), ("b", "trump_hillary")):
        (tmp_path / sub).mkdir()
        write(tmp_path / sub / "p.jpg", photo(name))
    r = cli("run", tmp_path / "a", tmp_path / "b", "--out-dir", tmp_path / "out")
    assert r.returncode == 2
    (line,) = err_lines(r)
    assert str(tmp_path / "a" / "p.jpg") in line and str(tmp_path / "b" / "p.jpg") in line
    assert str(tmp_path / "out" / "p.json") in line
    assert not (tmp_path / "out").exists()


def test_an_output_never_overwrites_an_input(tmp_path):
    write(tmp_path / "a.png", photo("JianzhuGuo"), ".png")
    write(tmp_path / "a_overlay.png", photo("emma"), ".png")
    before = (tmp_path / "a_overlay.png").read_bytes()
    r = cli("run", tmp_path / "a.png", tmp_path / "a_overlay.png")
    assert r.returncode == 2 and "would overwrite the input" in err_lines(r)[0]
    assert (tmp_path / "a_overlay.png").read_bytes() == before
    assert listing(tmp_path) == ["a.png", "a_overlay.png"]


@needs_torch
def test_videos_and_image_of_one_name(tmp_path):
    """clip.jpg, clip.mp4 and clip.avi: the image's outputs differ from the videos' (json/png vs jsonl/mp4) and
    keep their names; the two videos would share clip.jsonl, so both keep their suffix."""
    img = cv2.resize(photo("JianzhuGuo"), (320, 428))
    write(tmp_path / "clip.jpg", img)
    for ext, fourcc in ((".mp4", "mp4v"), (".avi", "MJPG")):
        vw = cv2.VideoWriter(str(tmp_path / f"clip{ext}"), cv2.VideoWriter_fourcc(*fourcc), 10, (320, 428))
        assert vw.isOpened()
        for _ in range(3):
            vw.write(img)
        vw.release()
    r = cli("run", tmp_path / "clip.jpg", tmp_path / "clip.mp4", tmp_path / "clip.avi", "--max-frames", "2")
    assert r.returncode == 0, err_lines(r)
    assert faces_in(tmp_path / "clip.json") == 1
    for stem in ("clip_mp4", "clip_avi"):
        lines = (tmp_path / f"{stem}.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(len(json.loads(ln)["faces"]) == 1 for ln in lines)
        assert (tmp_path / f"{stem}_overlay.mp4").stat().st_size > 0
    assert not (tmp_path / "clip.jsonl").exists()


# --------------------------------------------------------------------------------------- non-UTF-8 names
@needs_torch
def test_non_utf8_names_never_crash_and_the_folder_goes_on(tmp_path):
    folder = non_utf8_dir(tmp_path)
    bfolder = os.fsencode(folder)
    write(os.path.join(bfolder, b"caf\xe9.jpg"), photo("JianzhuGuo"))
    with open(os.path.join(bfolder, b"bad\xff.jpg"), "wb") as f:
        f.write(b"not an image")
    write(folder / "z.jpg", photo("trump_hillary"))
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 10 gigapixels claimed
    open(os.path.join(bfolder, b"v\xe9.mp4"), "wb").close()
    r = cli("run", bfolder, os.path.join(bfolder, b"v\xe9.mp4"))
    assert r.returncode == 2, r.stderr  # two inputs failed, not a crash (a segfault is 139)
    lines = err_lines(r)
    assert any("bad\\xff.jpg: error: cannot read image" in ln for ln in lines), lines
    assert any("v\\xe9.mp4" in ln and "UTF-8" in ln for ln in lines), lines
    assert any("bomb.png: error: cannot decode image" in ln and "larger than" in ln for ln in lines), lines
    assert faces_in(Path(os.fsdecode(os.path.join(bfolder, b"caf\xe9.json")))) == EXAMPLES["JianzhuGuo"]
    assert faces_in(folder / "z.json") == EXAMPLES["trump_hillary"]
    overlay = np.fromfile(os.fsdecode(os.path.join(bfolder, b"caf\xe9_overlay.png")), np.uint8)
    assert cv2.imdecode(overlay, cv2.IMREAD_COLOR).shape == photo("JianzhuGuo").shape
    assert not [n for n in listing(folder) if n.startswith(".")]  # no temp files left


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` gray pixels, with a tiny body (a decompression bomb)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) \
        + chunk(b"IEND", b"")


def test_a_device_is_not_read_as_an_image(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    r = cli("run", "/dev/zero", "--out-dir", tmp_path / "o", timeout=60)  # would be read forever
    assert r.returncode == 2
    assert err_lines(r) == ["edge3dfa: error: not an image file or a folder: /dev/zero"]


# ------------------------------------------------------------------------------------------------- EXIF
def exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 Exif segment holding only the Orientation tag (0x0112), built by hand."""
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack(">I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + jpeg[2:]


@needs_torch
def test_exif_rotated_photo_is_read_upright(tmp_path):
    """A portrait phone photo: pixels stored on their side, EXIF orientation 6 (display = stored turned 90
    degrees clockwise). Faces must be found where they are on the upright photo."""
    upright = photo("JianzhuGuo")
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    (tmp_path / "phone.jpg").write_bytes(exif_orientation(jpeg, 6))
    (tmp_path / "no_exif.jpg").write_bytes(jpeg)  # control: the same pixels without the tag
    write(tmp_path / "upright.jpg", upright, quality=95)
    try:
        from PIL import Image  # an independent EXIF reader, where installed, checks the hand-built segment

        assert Image.open(tmp_path / "phone.jpg").getexif().get(0x0112) == 6
    except ImportError:
        pass
    r = cli("run", tmp_path)
    assert r.returncode == 0, err_lines(r)
    phone, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("phone", "upright"))
    assert phone["size"] == ref["size"] == [upright.shape[1], upright.shape[0]]
    assert len(phone["faces"]) == len(ref["faces"]) == 1
    a, b = (np.array(j["faces"][0]["landmarks"])[:, :2] for j in (phone, ref))
    assert np.linalg.norm(a - b, axis=1).max() < 2.0  # same JPEG quality, same pixels up to re-encoding
    side = json.loads((tmp_path / "no_exif.json").read_text())
    assert side["size"] == [upright.shape[0], upright.shape[1]]  # without the tag: read as stored, on its side


# ----------------------------------------------------------------------------------------------- camera
@pytest.mark.parametrize("index", ["-1", "2147483648", pytest.param("987", marks=needs_torch)])
def test_invalid_camera_index_is_one_line_exit_2(index):
    r = cli("run", "--camera", index)
    assert r.returncode == 2, r.stderr  # -1 was a segfault (139) inside OpenCV
    (line,) = err_lines(r)  # OpenCV's own warnings silenced: one line
    assert line.startswith("edge3dfa: error:") and "camera" in line


@pytest.mark.parametrize("option", [("--threads", "-1"), ("--threads", str(2**40)), ("--max-frames", "0"),
                                    ("--probe", "nan"), ("--redetect-every", "-2"), ("--smooth-min-cutoff", "0")])
def test_run_options_out_of_range_exit_2(tmp_path, option):
    r = cli("run", assets.fetch("JianzhuGuo"), "--out-dir", tmp_path / "o", *option)
    assert r.returncode == 2
    (line,) = err_lines(r)
    assert option[0] in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- JSON + overlay together
FAIL_SECOND_RENAME = """
import errno, os
real, renamed = os.replace, []
def replace(src, dst):  # the second finished file cannot be put in place: the disk is full at the worst moment
    staged = os.path.dirname(os.fspath(src))  # fileio stages new files in TEMPFOLDER/new/NAME
    if os.path.basename(staged) == 'new' and os.path.basename(os.path.dirname(staged)).startswith('.'):
        renamed.append(dst)
        if len(renamed) == 2:
            raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(dst))
    return real(src, dst)
os.replace = replace
"""


@pytest.mark.slow
@needs_torch
def test_json_and_overlay_are_written_together(tmp_path):
    """One file of the new pair is renamed into place, then the other fails (a full disk at the worst moment):
    the earlier pair must stay exactly as it was, with no temp file and no new file beside an old one."""
    src = tmp_path / "p.jpg"
    write(src, photo("trump_hillary"))
    assert cli("run", src).returncode == 0
    old = {n: (tmp_path / n).read_bytes() for n in ("p.json", "p_overlay.png")}
    write(src, photo("JianzhuGuo"))  # a different photo under the same name: new outputs would differ
    r = cli("run", src, code=FAIL_SECOND_RENAME)
    assert r.returncode == 2
    (line,) = err_lines(r)
    assert "No space left on device" in line
    assert {n: (tmp_path / n).read_bytes() for n in old} == old
    assert listing(tmp_path) == ["p.jpg", "p.json", "p_overlay.png"]
    r = cli("run", src)  # and a re-run over them replaces both, leaving nothing else
    assert r.returncode == 0 and faces_in(tmp_path / "p.json") == EXAMPLES["JianzhuGuo"]
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["overlay_sha256"] == hashlib.sha256((tmp_path / "p_overlay.png").read_bytes()).hexdigest()
    assert listing(tmp_path) == ["p.jpg", "p.json", "p_overlay.png"]


@needs_torch
def test_file_size_limit_leaves_neither_file(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow a file past 64 kB, EFBIG) on the first
    file of a new pair: neither file appears, nothing is left, and the run stops with one line naming the file
    (the disk is the problem, not the image)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a.jpg", photo("JianzhuGuo"))
    write(folder / "b.jpg", photo("trump_hillary"))
    limit = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))")
    r = cli("run", folder, code=limit)
    assert r.returncode == 2
    lines = err_lines(r)
    assert lines == [f"edge3dfa: error: cannot write {folder / 'a_overlay.png'}: File too large"]
    assert listing(folder) == ["a.jpg", "b.jpg"]


# --------------------------------------------------------------------------------- calibration overlap
def eval_crop(name: str) -> np.ndarray:
    return cv2.imread(str(assets.fetch("aflw2000_crops") / name))


def default_crops(count: int) -> list[Path]:
    return sorted(assets.fetch("calibration_crops").iterdir())[:count]


@pytest.mark.parametrize("copy", ["png", "jpeg50", "jpeg95", "resized240", "resized60", "mirrored", "gray"])
def test_reencoded_evaluation_crop_is_refused(tmp_path, copy):
    from edge3dfa.datasets.calibration import load_calibration
    from edge3dfa.errors import Edge3dfaError

    for p in default_crops(8):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    crop = eval_crop("image00006.jpg")
    made = {"png": lambda: write(tmp_path / "zz.png", crop, ".png"),
            "jpeg50": lambda: write(tmp_path / "zz.jpg", crop, quality=50),
            "jpeg95": lambda: write(tmp_path / "zz.jpg", crop, quality=95),
            "resized240": lambda: write(tmp_path / "zz.png", cv2.resize(cv2.resize(crop, (240, 240)), (120, 120)),
                                        ".png"),
            "resized60": lambda: write(tmp_path / "zz.jpg", cv2.resize(cv2.resize(crop, (60, 60)), (120, 120))),
            "mirrored": lambda: write(tmp_path / "zz.jpg", crop[:, ::-1]),
            "gray": lambda: write(tmp_path / "zz.png", cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), ".png")}
    made[copy]()
    assert len(load_calibration(tmp_path, count=8)) == 8  # the legitimate crops before it pass
    with pytest.raises(Edge3dfaError, match=r"zz\.(png|jpg) is a (copy|near-duplicate) of AFLW2000-3D crop "
                                            r"image00006\.jpg"):
        load_calibration(tmp_path, count=9)


def test_photos_that_copy_the_evaluation_set_are_refused(tmp_path):
    """Photo calibration (not 120x120: detector -> crop): a crop saved at 240x240, and an original AFLW2000-3D
    photo re-encoded smaller, are caught as whole images whatever the detector frames."""
    from edge3dfa.datasets.calibration import load_calibration
    from edge3dfa.errors import Edge3dfaError

    def centre(img: np.ndarray) -> np.ndarray:  # a stand-in detector: one box in the middle of the image
        h, w = img.shape[:2]
        return np.array([[w * 0.3, h * 0.3, w * 0.7, h * 0.7, 0.99]], np.float32)

    write(tmp_path / "photo.jpg", photo("JianzhuGuo"))
    assert len(load_calibration(tmp_path, count=1, detector=centre)) == 1
    write(tmp_path / "q.jpg", cv2.resize(eval_crop("image00004.jpg"), (240, 240), interpolation=cv2.INTER_CUBIC))
    with pytest.raises(Edge3dfaError, match="q.jpg is a near-duplicate of AFLW2000-3D crop image00004.jpg"):
        load_calibration(tmp_path, count=2, detector=centre)
    (tmp_path / "q.jpg").unlink()
    original = cv2.imread(str(assets.fetch("aflw2000_original") / "image00008.jpg"))
    write(tmp_path / "r.jpg", cv2.resize(original, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA), quality=70)
    with pytest.raises(Edge3dfaError, match="r.jpg is a near-duplicate of AFLW2000-3D photo image00008.jpg"):
        load_calibration(tmp_path, count=2, detector=centre)


def test_default_calibration_set_passes_and_its_one_copy_is_caught():
    """The first 256 disjoint crops (the default set) pass. The shared folder also holds image67748.jpg, a copy
    of AFLW2000-3D image01624.jpg under another AFLW id (mean pixel difference below 5 of 255, computed here):
    asking for all 512 crops must be refused on it."""
    from edge3dfa.datasets.calibration import load_calibration
    from edge3dfa.errors import Edge3dfaError

    assert len(load_calibration(None, count=256)) == 256
    dup = cv2.imread(str(assets.fetch("calibration_crops") / "image67748.jpg")).astype(np.float32)
    assert np.abs(dup - eval_crop("image01624.jpg")).mean() < 5
    with pytest.raises(Edge3dfaError, match="image67748.jpg is a near-duplicate of AFLW2000-3D crop image01624"):
        load_calibration(None, count=512)


def test_fingerprint_cache_is_used_and_a_corrupt_one_rebuilt(tmp_path):
    code = ("import os, time\nfrom edge3dfa.datasets import overlap\n"
            "t = time.perf_counter(); overlap.reference('aflw2000_crops'); print(time.perf_counter() - t)\n")
    env = {**os.environ, "EDGE3DFA_CACHE": str(tmp_path)}
    run = lambda: subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    first = run()
    assert first.returncode == 0, first.stderr
    (cache,) = (tmp_path / "fingerprints").iterdir()
    built = cache.read_bytes()
    assert run().returncode == 0 and cache.read_bytes() == built
    cache.write_bytes(b"garbage")
    again = run()
    assert again.returncode == 0, again.stderr
    assert cache.read_bytes() == built  # rebuilt, identical


def test_a_named_pipe_among_calibration_crops_is_passed_over(tmp_path):
    """``0pipe.jpg``, a FIFO sorted first in --calib-dir, blocked the int8 conversion forever: only regular files
    are calibration images (as in run's folders). A fresh interpreter: a hang fails the test at its timeout."""
    for p in default_crops(8):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    os.mkfifo(tmp_path / "0pipe.jpg")
    code = ("from edge3dfa.datasets.calibration import load_calibration\n"
            f"print(load_calibration({str(tmp_path)!r}, count=8).files[0])")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == default_crops(1)[0].name, r.stderr


# ---------------------------------------------------------------------------------- calibration counts
@pytest.mark.parametrize("count, expected", [("0", "at least 1"), ("-3", "at least 1"), ("513", "more than the 512")])
def test_calibration_count_out_of_range_exit_2(tmp_path, count, expected):
    r = cli("convert", "--to", "onnx", "--precision", "int8", "--calib-count", count, "--out", tmp_path / "o")
    assert r.returncode == 2
    (line,) = err_lines(r)
    assert expected in line
    assert not list((tmp_path / "o").rglob("*.onnx")) if (tmp_path / "o").exists() else True


def test_onnx_calibrator_takes_any_count():
    """onnxruntime's calibrators on a hand-built graph (y = relu(x) * 2): 33 crops (a ragged last batch of 32
    crashed them) give the range numpy computes over all 33 (the largest value is in the 33rd), for MinMax and
    Percentile (at 100%, within one of its 2048 histogram bins)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import tempfile

    from onnx import TensorProto, helper
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from edge3dfa.converters.onnx.int8 import calibration_reader, equal_batch

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    x = np.random.default_rng(0).normal(size=(33, 3, 4, 4)).astype(np.float32)
    x[32, 1, 2, 3] = 10.0  # only the last crop holds the maximum
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
            cal = create_calibrator(path, augmented_model_path=str(Path(tmp) / "aug.onnx"), calibrate_method=method,
                                    extra_options={"percentile": 100.0} if method == CalibrationMethod.Percentile
                                    else {})
            cal.collect_data(calibration_reader(x, "input", 32))
            ranges = cal.compute_data()
            lo, hi = np.asarray(ranges["y"].range_value, np.float64).ravel()
            assert (lo, hi) == pytest.approx((0.0, 20.0), abs=20.0 / 2048), method
    assert [equal_batch(n, 32) for n in (1, 32, 33, 64, 100, 256, 257)] == [1, 32, 11, 32, 25, 32, 1]


@needs_torch
@pytest.mark.slow
def test_onnx_int8_with_33_calibration_crops(tmp_path):
    r = cli("convert", "--to", "onnx", "--precision", "int8", "--calib-count", "33", "--out", tmp_path)
    assert r.returncode == 0, err_lines(r)
    manifest = json.loads((tmp_path / "mb05" / "onnx" / "mb05_int8.json").read_text())
    assert manifest["calibration"]["count"] == 33


# ----------------------------------------------------------------------------------------- convert plan
@pytest.mark.parametrize("args, expected", [
    (("--to", ","), "no format given"),
    (("--to", ""), "no format given"),
    (("--precision", ","), "no precision given"),
    (("--precision", "int4"), "does not offer precision int4"),
    (("--precision", "int8", "--nme-budget", "nan"), "finite number >= 0"),
    (("--precision", "int8", "--nme-budget", "inf"), "finite number >= 0"),
    (("--precision", "int8", "--nme-budget", "-0.1"), "finite number >= 0"),
    (("--precision", "fp32", "--nme-budget", "0.05"), "add int8"),
])
def test_convert_plan_that_builds_nothing_is_exit_2(tmp_path, args, expected):
    r = cli("convert", "--out", tmp_path / "o", *args, timeout=120)
    assert r.returncode == 2
    (line,) = err_lines(r)
    assert expected in line
    assert not (tmp_path / "o").exists()


OVER_BUDGET = """
from pathlib import Path
import edge3dfa.converters as conv
from edge3dfa.manifest import Manifest
def fake(*a, **k):
    m = Manifest(artifact='m_int8.onnx', format='onnx', precision='int8', model='mb05', arch='mobilenet',
                 source={}, size_bytes=1, quantization={'met': False, 'budget': {'nme': 0.01},
                                                        'delta': {'balanced': 0.03}})
    return [conv.Artifact(Path('out/mb05/onnx/m_int8.onnx'), m)]
conv.convert = fake
"""


@pytest.mark.parametrize("allow", [False, True])
def test_budget_not_met_exits_1_unless_allowed(allow):
    r = cli("convert", "--precision", "int8", "--nme-budget", "0.01", *(["--allow-over-budget"] if allow else []),
            code=OVER_BUDGET)
    assert r.returncode == (0 if allow else 1)
    (line,) = err_lines(r)
    assert "does not meet --nme-budget 0.01" in line and "+0.030" in line
    assert line.startswith("edge3dfa: warning:" if allow else "edge3dfa: error:")


# ------------------------------------------------------------------------------------------ --dense-bfm files
def _bad_bfm(tmp_path: Path, kind: str) -> Path:
    import pickle

    u, w = np.zeros((300, 1), np.float32), np.zeros((300, 40), np.float32)
    path = tmp_path / ("bfm.pkl" if kind in ("list", "object-pkl") else "bfm.npz")
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04garbage" * 10)  # a zip header and nothing else
    elif kind == "1-D":
        np.savez(path, u=np.zeros(30), w_shp=np.zeros(30), w_exp=np.zeros(30))
    elif kind == "object":
        np.savez(path, u=np.array([{"a": 1}], dtype=object), w_shp=w, w_exp=w[:, :10])
    elif kind == "list":
        path.write_bytes(pickle.dumps(["u", "w_shp", "w_exp"]))
    elif kind == "object-pkl":
        path.write_bytes(pickle.dumps({"u": np.array([{"a": 1}], dtype=object), "w_shp": w, "w_exp": w}))
    elif kind == "rows":
        np.savez(path, u=u, w_shp=w[:299], w_exp=w[:, :10])
    elif kind == "tri":
        np.savez(path, u=u, w_shp=w, w_exp=w[:, :10], tri=np.array([[0, 1, 100]]))  # 100 vertices: ids 0..99
    elif kind == "nan":
        np.savez(path, u=np.full((300, 1), np.nan), w_shp=w, w_exp=w[:, :10])
    return path


@pytest.mark.parametrize("kind, needle", [
    ("garbage", "not a BFM file"), ("1-D", "'w_shp' must be a non-empty 2-D numeric array"),
    ("object", "not a BFM file"), ("list", "holds a list, not a dict of arrays"),
    ("object-pkl", "'u' must be a non-empty 1 or 2-D numeric array, got a 1-D object array"),
    ("rows", "inconsistent BFM shapes"), ("tri", "'tri' must be [T,3] vertex ids below 100"),
    ("nan", "'u' holds NaN or Inf")])
def test_a_bad_dense_bfm_file_is_one_error_naming_it(tmp_path, kind, needle):
    """run --dense-bfm took these as a BFM and failed inside numpy: BadZipFile, IndexError, ValueError and
    TypeError, each an internal error (exit 3). Each is an Edge3dfaError (exit 2) naming the file."""
    from edge3dfa.errors import Edge3dfaError
    from edge3dfa.runtime import load_dense_bfm

    path = _bad_bfm(tmp_path, kind)
    with pytest.raises(Edge3dfaError) as e:
        load_dense_bfm(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), e.value
