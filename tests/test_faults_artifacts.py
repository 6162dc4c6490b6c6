"""Faults of artifacts and their manifests (issue 14, parts 1-2 and 6): each is exit 2 in one line, nothing written.

Real faults, not mocks: bytes flipped in a real conversion, files swapped or renamed, manifests edited by hand,
small ONNX graphs built with onnx.helper whose outputs are NaN, huge or fail at run time (with truthful
manifests written by edge3dfa.manifest, so only the outputs are wrong), and option typos on the command line.
Commands that run a model end to end go through a subprocess (a crash there would be a real crash).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge3dfa import assets  # noqa: E402
from edge3dfa.cli import main  # noqa: E402
from edge3dfa.converters import convert, formats, get_format  # noqa: E402
from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.manifest import CANONICAL_INPUT, Manifest, current_sha256, manifest_path, publish  # noqa: E402
from edge3dfa.target import open_target, runtime_class  # noqa: E402

FAST_VALIDATE = ["--samples", "8", "--latency-runs", "0", "--reference", "none"]


# ---------------------------------------------------------------------------------------------- helpers
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = f"import sys\nfrom edge3dfa.cli import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _one_error(stderr: str, *needles: str) -> str:
    """The single line of stderr, an edge3dfa error containing every needle; no traceback."""
    lines = _lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("edge3dfa: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _edit_manifest(artifact: Path, **changes) -> Path:
    mpath = manifest_path(artifact)
    d = json.loads(mpath.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            d[outer][inner] = value
        else:
            d[key] = value
    mpath.write_text(json.dumps(d))
    return mpath


def _graph(path: Path, *, bias: float = 0.0, sqrt: bool = False, broken: bool = False) -> None:
    """input [N,3,120,120] -> params [N,62] = bias (or sqrt(mean(x)) + bias: NaN where the crop's mean is < 0).

    ``broken``: the mean is flattened to [N] before a [1,62] MatMul, which only fails when run with N > 1."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 120, 120])
    y = helper.make_tensor_value_info("params", TensorProto.FLOAT, ["N", 62])
    w = np.full((1, 62), 1.0 if sqrt else 0.0, np.float32)
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(62, bias, np.float32), "b")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["r"], keepdims=0 if broken else 1),
             helper.make_node("Identity" if broken else "Flatten", ["r"], ["m"]),
             helper.make_node("Sqrt" if sqrt else "Identity", ["m"], ["s"]),
             helper.make_node("MatMul", ["s", "w"], ["z"]),
             helper.make_node("Add", ["z", "b"], ["params"])]
    model = helper.make_model(helper.make_graph(nodes, "handbuilt", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    if not broken:
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def _published_graph(folder: Path, name: str, **kw) -> Path:
    """A hand-built graph with a truthful manifest (fp32 ONNX, canonical input): only its outputs are wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp.onnx"
    _graph(tmp, **kw)
    m = Manifest(artifact="", format="onnx", precision="fp32", model=name, arch="handbuilt",
                 source={"path": "tests/test_faults_artifacts.py", "sha256": None})
    return publish(tmp, folder / f"{name}.onnx", m)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """mb05 converted to ONNX fp32 and dyn-int8 (no calibration needed), once for the module."""
    out = tmp_path_factory.mktemp("converted")
    arts = convert("mb05", to="onnx", precision=["fp32", "dyn-int8"], out_dir=out, parity_count=8, verbose=False)
    return {a.manifest.precision: a.path for a in arts}


@pytest.fixture
def pair(converted, tmp_path) -> dict[str, Path]:
    """A fresh copy of the converted folder (artifacts + manifests) that a test may damage."""
    folder = tmp_path / "mb05" / "onnx"
    shutil.copytree(converted["fp32"].parent, folder)
    return {p: folder / path.name for p, path in converted.items()}


@pytest.fixture(scope="module")
def photo() -> str:
    return str(assets.fetch("emma"))


def _run_in_process(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err


# -------------------------------------------------------------------------------- tampered and swapped
@pytest.mark.slow
def test_tampered_artifact_is_exit_2_for_run_and_validate(pair, photo, tmp_path):
    art = pair["fp32"]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte: the file still loads and runs, 74 px off in issue 14
    art.write_bytes(bytes(data))
    out = tmp_path / "results"
    r = _cli("run", photo, "--artifact", str(art), "--out-dir", str(out))
    assert r.returncode == 2
    _one_error(r.stderr, str(art), "changed since conversion", "artifact_sha256", str(manifest_path(art)))
    assert not out.exists()
    code = main(["validate", str(art.parent), *FAST_VALIDATE, "--report-dir", str(tmp_path / "report")])
    assert code == 2 and not (tmp_path / "report").exists()


@pytest.mark.slow
def test_swapped_file_under_the_fp32_name_is_exit_2(pair, photo, capsys):
    shutil.copy(pair["dyn-int8"], pair["fp32"])  # the int8 file under the fp32 name, fp32 manifest kept
    code, err = _run_in_process(capsys, photo, "--artifact", str(pair["fp32"]))
    assert code == 2
    _one_error(err, "mb05_fp32.onnx changed since conversion")


@pytest.mark.slow
def test_renamed_pair_is_exit_2(pair, photo, capsys, tmp_path):
    """Artifact and manifest of dyn-int8 both renamed to the fp32 names: the manifest still names the old file."""
    fp32 = pair["fp32"]
    os.replace(pair["dyn-int8"], fp32)
    os.replace(manifest_path(pair["dyn-int8"]), manifest_path(fp32))
    code, err = _run_in_process(capsys, photo, "--artifact", str(fp32))
    assert code == 2
    _one_error(err, "field 'artifact' names 'mb05_dyn-int8.onnx'")
    assert main(["validate", str(fp32.parent), *FAST_VALIDATE, "--report-dir", str(tmp_path / "r")]) == 2
    _one_error(capsys.readouterr().err, "field 'artifact'")


@pytest.mark.slow
def test_int8_file_under_a_rehashed_fp32_manifest_is_exit_2(pair, photo, capsys):
    """A manifest edited to match the swapped file's sha256 still says fp32: the graph has quantized ops."""
    fp32 = pair["fp32"]
    shutil.copy(pair["dyn-int8"], fp32)
    _edit_manifest(fp32, artifact_sha256=current_sha256(fp32))
    code, err = _run_in_process(capsys, photo, "--artifact", str(fp32))
    assert code == 2
    _one_error(err, "field 'precision' is 'fp32'", "quantized")


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [
    ({"format": "tflite"}, "field 'format' is 'tflite'"),
    ({"precision": "int4"}, "field 'precision' is 'int4'"),
    ({"precision": "dyn-int8"}, "field 'precision' is 'dyn-int8'"),  # offered by onnx, but the file is float
    ({"input.shape": ["N", 3, 112, 112]}, "field 'input.shape'"),
    ({"input.layout": "NHWC"}, "field 'input.layout' is 'NHWC'"),
    ({"input.dtype": "int8"}, "field 'input.dtype' is 'int8'"),
])
def test_manifest_that_does_not_describe_the_file_is_exit_2(pair, photo, capsys, tmp_path, change, field):
    _edit_manifest(pair["fp32"], **change)
    code, err = _run_in_process(capsys, photo, "--artifact", str(pair["fp32"]), "--out-dir", str(tmp_path / "o"))
    assert code == 2
    _one_error(err, str(pair["fp32"]), str(manifest_path(pair["fp32"])), field)
    assert not (tmp_path / "o").exists()
    assert main(["validate", str(pair["fp32"].parent), *FAST_VALIDATE, "--report-dir", str(tmp_path / "r")]) == 2
    _one_error(capsys.readouterr().err, field)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------- malformed manifests
MALFORMED = {
    "not json": ("{broken", "is not valid JSON"),
    "nested too deeply": ("[" * 100_000, "nested too deeply"),
    "a list": ([1, 2], "holds a list, not an object"),
    "no schema": ({"schema": None}, "field 'schema'"),
    "foreign schema": ({"schema": "other.manifest/1"}, "not an edge3dfa manifest"),
    "future schema": ({"schema": "edge3dfa.manifest/2"}, "edge3dfa.manifest/2 is newer than what edge3dfa"),
    "missing keys": ({"artifact_sha256": ..., "input": ...}, "missing field(s) 'artifact_sha256', 'input'"),
    "source a string": ({"source": "mb05.pth"}, "field 'source' must be an object"),
    "size a string": ({"size_bytes": "big"}, "field 'size_bytes' must be an integer"),
    "notes not strings": ({"notes": [1]}, "field 'notes' must be a list of strings"),
    "sha not hex": ({"artifact_sha256": "abc"}, "field 'artifact_sha256' must be 64 lowercase hex"),
    "absolute artifact": ({"artifact": "/etc/mb05_fp32.onnx"}, "field 'artifact' must be a file name"),
    "parent artifact": ({"artifact": "../mb05_fp32.onnx"}, "field 'artifact' must be a file name"),
    "nested artifact": ({"artifact": "sub/mb05_fp32.onnx"}, "field 'artifact' must be a file name"),
    "windows artifact": ({"artifact": "C:mb05_fp32.onnx"}, "field 'artifact' must be a file name"),
    "empty precision": ({"precision": " "}, "field 'precision' is empty"),
    "input shape junk": ({"input": {**CANONICAL_INPUT, "shape": "N,3,120,120"}}, "field 'input.shape'"),
}


def _malform(mpath: Path, spec: object) -> None:
    if isinstance(spec, str):
        mpath.write_text(spec)
    elif isinstance(spec, list):
        mpath.write_text(json.dumps(spec))
    else:
        d = json.loads(mpath.read_text())
        for k, v in spec.items():
            if v is ...:
                del d[k]
            else:
                d[k] = v
        mpath.write_text(json.dumps(d))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_one_line_exit_2_naming_file_and_field(pair, photo, capsys, tmp_path, case):
    spec, needle = MALFORMED[case]
    mpath = manifest_path(pair["fp32"])
    _malform(mpath, spec)
    code, err = _run_in_process(capsys, photo, "--artifact", str(pair["fp32"]), "--out-dir", str(tmp_path / "o"))
    assert code == 2
    _one_error(err, str(mpath), needle)
    assert main(["validate", str(mpath.parent), *FAST_VALIDATE, "--report-dir", str(tmp_path / "r")]) == 2
    _one_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_unknown_keys_are_kept_and_tolerated(pair):
    """A newer writer may add keys within one schema version: read, kept in ``extra``, written back unchanged."""
    mpath = _edit_manifest(pair["fp32"], made_by_a_newer_edge3dfa={"x": 1})
    m = Manifest.read(mpath)
    assert m.extra == {"made_by_a_newer_edge3dfa": {"x": 1}}
    assert m.to_dict()["made_by_a_newer_edge3dfa"] == {"x": 1}
    assert open_target(pair["fp32"], threads=1).manifest.precision == "fp32"


# ------------------------------------------------------------------------------------- opting out, no manifest
@pytest.mark.slow
def test_no_verify_runs_a_mismatched_artifact_with_a_warning(pair, photo, tmp_path):
    shutil.copy(pair["dyn-int8"], pair["fp32"])  # a real model, but not the one the manifest describes
    out = tmp_path / "results"
    r = _cli("run", photo, "--artifact", str(pair["fp32"]), "--out-dir", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in _lines(r.stderr) if ln.startswith("edge3dfa: warning")]
    assert warnings == [f"edge3dfa: warning: --no-verify: {pair['fp32']} is used without checking it against "
                        "its manifest"]
    assert "Traceback" not in r.stderr
    assert [p.name for p in _files(out)] == ["emma.json", "emma_overlay.png"]


@pytest.mark.slow
def test_validate_no_verify_evaluates_with_a_warning(pair, tmp_path, capsys):
    shutil.copy(pair["dyn-int8"], pair["fp32"])
    report = tmp_path / "report"
    code = main(["validate", str(pair["fp32"].parent), *FAST_VALIDATE, "--report-dir", str(report), "--no-verify"])
    err = capsys.readouterr().err
    assert "warning: --no-verify" in err and "Traceback" not in err
    assert code in (0, 1) and (report / "report.json").is_file()  # the verdict itself is the gates' business


@pytest.mark.slow
def test_artifact_without_manifest_opens_and_the_cli_says_so_once(converted, tmp_path, capsys):
    from edge3dfa.cli import open_artifact

    third_party = tmp_path / "third_party.onnx"
    shutil.copy(converted["fp32"], third_party)
    target = open_target(third_party, threads=1)  # the API: opens, and says through target.manifest
    assert target.manifest is None and capsys.readouterr().err == ""
    open_artifact(str(third_party), threads=1)
    assert _lines(capsys.readouterr().err) == [
        f"edge3dfa: warning: {third_party} has no manifest beside it: its origin and integrity are not verified"]
    assert open_target(converted["fp32"], threads=1).manifest.artifact == converted["fp32"].name
    assert open_target("mb05", threads=1).manifest is None  # the PyTorch reference has none, and needs none


@pytest.mark.slow
def test_validate_hashes_each_artifact_once(converted, tmp_path, monkeypatch):
    """discover() and every latency open share one verification: the sha256 is taken once per artifact."""
    import edge3dfa.manifest as manifest_module

    folder = tmp_path / "mb05"
    shutil.copytree(converted["fp32"].parent, folder)
    hashed: list[str] = []
    real = manifest_module.artifact_sha256
    monkeypatch.setattr(manifest_module, "artifact_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    args = ["--samples", "8", "--reference", "none", "--latency-runs", "2", "--latency-warmup", "0",
            "--latency-batch", "1", "--latency-threads", "1,2"]
    main(["validate", str(folder), *args, "--report-dir", str(tmp_path / "r")])
    assert sorted(hashed) == ["mb05_dyn-int8.onnx", "mb05_fp32.onnx"]
    art = folder / "mb05_fp32.onnx"
    art.write_bytes(art.read_bytes()[:-1] + b"\0")  # any change is hashed again
    assert current_sha256(art) != Manifest.read(manifest_path(art)).artifact_sha256


def test_every_runtime_accepts_exactly_the_precisions_its_converter_writes():
    for fmt in formats():
        cls = runtime_class(f"x{get_format(fmt).suffix}")
        assert cls.format == fmt
        assert set(cls.precisions) == set(get_format(fmt).precisions), fmt


# --------------------------------------------------------------------------------------- broken outputs
@pytest.mark.parametrize("bias, needle", [(float("nan"), "produced NaN/Inf for 3 of 3 samples"),
                                          (1e30, "params out of range (largest |output| 1e+30)")])
def test_nan_or_huge_outputs_make_run_exit_2(tmp_path, photo, bias, needle):
    art = _published_graph(tmp_path / "models", "const", bias=bias)
    out = tmp_path / "results"
    r = _cli("run", photo, "--artifact", str(art), "--out-dir", str(out))
    assert r.returncode == 2
    _one_error(r.stderr, "onnxruntime:const.onnx", needle)  # emma.jpg has three faces
    assert not out.exists()


def test_a_graph_that_fails_at_run_time_is_exit_2(tmp_path, photo):
    art = _published_graph(tmp_path / "models", "broken", broken=True)
    r = _cli("run", photo, "--artifact", str(art), "--out-dir", str(tmp_path / "results"))
    assert r.returncode == 2
    _one_error(r.stderr, "onnxruntime:broken.onnx: the model failed on a [3, 3, 120, 120] batch")


def test_predict_counts_the_samples_with_nan(tmp_path):
    """sqrt(mean(x)) is NaN exactly for crops whose mean is negative: 2 of 3 here."""
    path = tmp_path / "sqrt.onnx"
    _graph(path, sqrt=True)
    target = open_target(path, threads=1)
    x = np.stack([np.full((3, 120, 120), v, np.float32) for v in (-0.5, 0.25, -0.1)])
    with pytest.raises(Edge3dfaError, match=r"onnxruntime:sqrt.onnx: produced NaN/Inf for 2 of 3 samples"):
        target.predict(x)
    np.testing.assert_allclose(target.predict(x[1:2]), 0.5)  # the finite sample alone is fine


def test_nan_input_is_bad_input_not_a_broken_artifact(tmp_path):
    """x * 0 + bias passes NaN through: the artifact was blamed ("re-convert it") for the caller's NaN."""
    path = tmp_path / "const.onnx"
    _graph(path)
    target = open_target(path, threads=1)
    x = np.zeros((3, 3, 120, 120), np.float32)
    x[1, 0, 5, 5], x[2, 2, 0, 0] = np.nan, -np.inf
    with pytest.raises(Edge3dfaError, match=r"const.onnx: the input holds NaN/Inf in 2 of 3 samples \(bad input"):
        target.predict(x)
    np.testing.assert_array_equal(target.predict(x[:1]), 0.0)


def test_a_landmark_model_given_as_the_detector_is_exit_2(converted, photo, tmp_path):
    """run --detector mb05_fp32.onnx: one [N,62] output where FaceBoxes has two was an internal error
    (ValueError: not enough values to unpack)."""
    r = _cli("run", photo, "--detector", str(converted["fp32"]), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2
    _one_error(r.stderr, "onnxruntime:mb05_fp32.onnx: returned 1 output(s)", "landmark model")
    assert not (tmp_path / "o").exists()


def test_detector_outputs_are_checked_too(tmp_path):
    """run() checks every output (FaceBoxes' loc and conf), not only predict()'s params."""
    path = tmp_path / "det.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    loc = helper.make_tensor_value_info("loc", TensorProto.FLOAT, ["N", 1, 1, 1])
    conf = helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["N", 1, 1, 1])
    axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["loc"], keepdims=1),
             helper.make_node("Log", ["loc"], ["conf"])]  # log of a negative mean: NaN
    onnx.save(helper.make_model(helper.make_graph(nodes, "det", [x], [loc, conf], [axes]),
                                opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    target = open_target(path, threads=1)
    with pytest.raises(Edge3dfaError, match="det.onnx: produced NaN/Inf for 1 of 2 samples"):
        target.run(np.stack([np.full((3, 64, 64), v, np.float32) for v in (0.5, -0.5)]))


def test_wide_float_outputs_that_overflow_float32_are_rejected(tmp_path):
    """A float64 output of 1e60 is finite, but as predict's float32 params it would be inf."""
    path = tmp_path / "wide.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 120, 120])
    y = helper.make_tensor_value_info("params", TensorProto.DOUBLE, ["N", 62])
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.zeros((1, 62)), "w"), numpy_helper.from_array(np.full(62, 1e30), "b")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["r"], keepdims=1),
             helper.make_node("Flatten", ["r"], ["m"]), helper.make_node("Cast", ["m"], ["m64"], to=TensorProto.DOUBLE),
             helper.make_node("MatMul", ["m64", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["p"]),
             helper.make_node("Mul", ["p", "p"], ["params"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "wide", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    target = open_target(path, threads=1)
    x = np.zeros((1, 3, 120, 120), np.float32)
    raw = target.run(x)[0]
    assert raw.dtype == np.float64 and np.isfinite(raw).all() and raw.min() > 1e59
    with pytest.raises(Edge3dfaError, match="produced NaN/Inf for 1 of 1 samples"):
        target.predict(x)


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("to, precision, option, needle", [
    ("tflite", "dyn-int8", "fc_per_channel=flase", "tflite option fc_per_channel must be true or false, got 'flase'"),
    ("tflite", "fp32", "fc_per_chanel=true", "unknown tflite option(s) fc_per_chanel; known:"),
    ("coreml", "fp32", "exclude=/conv1", "unknown coreml option(s) exclude; known: activations, calib_method, compute"),
    ("coreml", "fp32", "input=img", "coreml option input='img' is not one of tensor, image"),
    ("onnx,tflite", "fp32", "tflite.params_layer=landmarks", "tflite option params_layer='landmarks' is not one of"),
    ("coreml", "w8", "deployment_target=ios15", "deployment_target='ios15' is not one of iOS16, iOS17, iOS18"),
    ("onnx,tflite", "fp32", "head=landmarks", "option head: say which format it is for"),  # which one's head?
    ("onnx", "fp32", "opset=17.5", "onnx option opset must be a whole number, got '17.5'"),  # was silently 17
])
def test_option_typos_are_exit_2_before_anything_is_converted(tmp_path, capsys, to, precision, option, needle):
    out = tmp_path / "out"
    code = main(["convert", "--model", "mb05", "--to", to, "--precision", precision, "--option", option,
                 "--out", str(out)])
    assert code == 2
    _one_error(capsys.readouterr().err, needle)
    assert not out.exists()  # not even the onnx artifact of "onnx,tflite"


# ------------------------------------------------------------------------------------------ thread counts
@pytest.mark.parametrize("threads", [0, -1, 10**5, 2**40, 1.5, True, "2"])
def test_a_thread_count_no_runtime_can_take_is_a_one_line_error(converted, threads):
    """Every runtime shares one check: onnxruntime took 0/-1 as "its default" and raised a TypeError on 2**40;
    torch raised on 0/-1 and segfaulted on 10**5 (OpenMP could not create the threads)."""
    from edge3dfa.targets.torch import TorchTarget

    for opened in (lambda: open_target(converted["fp32"], threads=threads), lambda: TorchTarget(threads=threads)):
        with pytest.raises(Edge3dfaError, match=r"threads must be a whole number from 1 to \d+ \(the CPUs"):
            opened()


@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--threads", "-1"), ("--threads", "100000"),
                                           ("--latency-threads", "1,100000")])
def test_validate_refuses_a_thread_count_before_any_work(pair, tmp_path, option, value):
    """validate took --threads 0 as 1 (exit 0), -1 was an internal error (exit 3), 100000 segfaulted."""
    report = tmp_path / "report"
    r = _cli("validate", str(pair["fp32"].parent), *FAST_VALIDATE, option, value, "--report-dir", str(report))
    assert r.returncode == 2, r.stderr
    _one_error(r.stderr, f"{option} must be a whole number from 1 to")
    assert not report.exists()


# ------------------------------------------------------------------------------ named pipes, symlink loops
def _py(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: a hang (a named pipe opened for reading) fails the test at ``timeout``."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def test_a_named_pipe_in_a_manifest_place_never_blocks(pair):
    """A FIFO named like a manifest blocked validate's walk (x.json) and run --artifact (the artifact's own
    manifest) forever: the walk passes over it, opening the artifact refuses it in one line."""
    folder = pair["fp32"].parent
    os.mkfifo(folder / "x.json")
    r = _py(f"from edge3dfa.validation.harness import discover\nprint(len(discover({str(folder)!r})))")
    assert r.returncode == 0 and r.stdout.split() == ["2"], r.stderr
    mpath = manifest_path(pair["fp32"])
    mpath.unlink()
    os.mkfifo(mpath)
    r = _py(f"from edge3dfa.target import open_target\nopen_target({str(pair['fp32'])!r})")
    assert r.returncode == 1 and f"Edge3dfaError: manifest {mpath} is not a regular file" in r.stderr, r.stderr


def test_a_symlink_loop_named_like_an_artifact_is_one_line_exit_2(pair, tmp_path, capsys):
    """``loop.onnx -> loop.onnx`` was an internal error (RuntimeError from Path.resolve)."""
    folder = pair["fp32"].parent
    os.symlink("loop.onnx", folder / "loop.onnx")
    assert main(["validate", str(folder), *FAST_VALIDATE, "--report-dir", str(tmp_path / "r")]) == 2
    _one_error(capsys.readouterr().err, str(folder / "loop.onnx"), "link to nothing")
    assert not (tmp_path / "r").exists()
