"""Fault tests of the verdict (issue 14 part 1, export's plan checks): a verdict never says PASSED over something
that failed or was not checked.

Faults are real: a truncated .onnx, hand-built ONNX graphs (onnx.helper) whose outputs are NaN, 1e30 or the mean
face, another model's weights under a manifest, a real lossy conversion (CoreML 4-bit palettes), an import blocked
in a fresh interpreter, a conversion that raises. Every artifact has a complete manifest written by
``edge3dfa.manifest.publish`` (sha256, size, format, precision, canonical input/output), so the faults are in
what the artifact computes, not in its bookkeeping. Each test asserts the exit code, that no traceback is
printed, and the verdict in report.json.
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

from edge3dfa import assets
from edge3dfa.assets import sha256_file
from edge3dfa.cli import main
from edge3dfa.manifest import Manifest, manifest_path, publish

FAST = ["--samples", "50", "--latency-runs", "0"]
MBV3_MODEL = "mbv3_05_distilled_120x120"  # the name convert gives the fixture (its checkpoint stem)


def _source(asset: str) -> dict:
    path = assets.fetch(asset)
    return {"path": str(path), "sha256": sha256_file(path), "widen_factor": 0.5}


def _place(artifact: Path, folder: Path, name: str, **fields) -> Path:
    """Copy ``artifact`` into ``folder`` as ``name`` with a manifest published by edge3dfa (sha256 recomputed).

    ``fields`` override the manifest read beside ``artifact`` (or make a new one when there is none).
    """
    folder.mkdir(parents=True, exist_ok=True)
    src_manifest = manifest_path(artifact)
    if src_manifest.is_file():
        m = Manifest.read(src_manifest)
    else:
        m = Manifest(artifact=name, format="onnx", precision="fp32", model="mb05", arch="mobilenet_v1",
                     source=_source("mb05"))
    for k, v in fields.items():
        setattr(m, k, v)
    tmp = folder / f".tmp-{name}"
    shutil.copy(artifact, tmp)
    return publish(tmp, folder / name, m)


def _constant_onnx(path: Path, values: np.ndarray | float) -> Path:
    """An ONNX graph [N,3,120,120] float32 'input' -> [N,62] 'params' that outputs ``values`` for every crop."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    value = np.broadcast_to(np.asarray(values, np.float32), (62,)).reshape(1, 62)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=1),  # [N,1,1,1]
             helper.make_node("Flatten", ["m"], ["f"], axis=1),  # [N,1]: keeps the batch dimension
             helper.make_node("Mul", ["f", "zero"], ["z"]),  # [N,62] zeros
             helper.make_node("Add", ["z", "value"], ["params"])]
    graph = helper.make_graph(
        nodes, "constant", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 120, 120])],
        [helper.make_tensor_value_info("params", TensorProto.FLOAT, ["N", 62])],
        [numpy_helper.from_array(np.zeros((1, 62), np.float32), "zero"), numpy_helper.from_array(value, "value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _rows(report: dict) -> dict[str, dict]:
    return {Path(r["artifact"]).name if r["artifact"] else r["key"]: r for r in report["targets"]}


def _failed_gates(row: dict) -> set[str]:
    return {g["gate"] for g in row["gates"] if g["passed"] is False}


def _first_lines(rep: Path, verdict: str) -> None:
    """The verdict is the first line of report.md and of the HTML body, and the report rendered fully."""
    md = (rep / "report.md").read_text()
    assert md.splitlines()[0].startswith(f"**Verdict: {verdict} ("), md[:200]
    page = (rep / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    assert body.startswith("<p class=") and f"Verdict: {verdict} (" in body.split("</p>", 1)[0]
    assert "<h2>Accuracy (NME %)</h2>" in page and page.rstrip().endswith("</html>")


def _clean(err: str) -> None:
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory):
    """mb05 and the MobileNet-V3 fixture converted to ONNX fp32 once, with their manifests."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from edge3dfa.converters import convert

    root = tmp_path_factory.mktemp("converted")
    mb05 = convert("mb05", to="onnx", precision="fp32", out_dir=root, parity_count=8, verbose=False)[0].path
    mbv3 = convert(assets.fetch("mbv3_05_distilled"), to="onnx", precision="fp32", out_dir=root, parity_count=8,
                   verbose=False)[0].path
    return {"mb05": mb05, "mbv3": mbv3}


# ---------------------------------------------------------------- artifacts that cannot be opened, run or scored


def test_unopenable_nan_and_huge_artifacts_fail_and_the_report_renders(onnx_fp32, tmp_path, capsys):
    folder, rep = tmp_path / "out", tmp_path / "rep"
    _place(onnx_fp32["mb05"], folder, "mb05_fp32.onnx")
    data = onnx_fp32["mb05"].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])  # a copy cut short, e.g. by a full disk
    _place(tmp_path / "cut.onnx", folder, "mb05_cut.onnx")
    _place(_constant_onnx(tmp_path / "nan.onnx", np.nan), folder, "mb05_nan.onnx")
    _place(_constant_onnx(tmp_path / "huge.onnx", 1e30), folder, "mb05_huge.onnx")

    rc = main(["validate", str(folder), *FAST, "--report-dir", str(rep)])
    out, err = capsys.readouterr()
    _clean(err)
    report = _report(rep)
    assert rc == 1 and report["verdict"] == "FAILED" and report["passed"] is False
    assert out.splitlines()[0].startswith("Verdict: FAILED (")
    _first_lines(rep, "FAILED")
    rows = _rows(report)
    assert rows["mb05_fp32.onnx"]["status"] == "ok" and rows["mb05_fp32.onnx"]["verdict"] == "PASSED"
    cut, nan, huge = rows["mb05_cut.onnx"], rows["mb05_nan.onnx"], rows["mb05_huge.onnx"]
    assert cut["status"] == "error" and "mb05_cut.onnx" in cut["reason"] and cut["verdict"] == "FAILED"
    assert nan["status"] == "error" and nan["verdict"] == "FAILED"
    assert "NaN" in nan["reason"] or "non-finite" in nan["reason"]
    # 1e30 params: either the landmarks overflow (error) or they are finite and far beyond every gate
    assert huge["verdict"] == "FAILED" and (huge["status"] == "error" or {"max_nme"} <= _failed_gates(huge))
    for r in (cut, nan):
        assert r["nme"] is None and r["gates"] == [] and any(r["reason"] in line for line in report["verdict_reasons"])
    assert (rep / "report_ced.png").is_file()  # plots of the rows that were scored


def test_an_unexpected_exception_in_one_row_is_an_error_row_with_a_log(onnx_fp32, tmp_path, monkeypatch, capsys):
    from edge3dfa.targets.onnxruntime import OnnxTarget

    folder, rep = tmp_path / "out", tmp_path / "rep"
    _place(onnx_fp32["mb05"], folder, "mb05_fp32.onnx")
    _place(onnx_fp32["mb05"], folder, "mb05_bug.onnx")
    real = OnnxTarget._run

    def buggy(self, x):  # noqa: ANN001, ANN202
        if self.path.name == "mb05_bug.onnx":
            return {}["a bug in one runtime"]
        return real(self, x)

    monkeypatch.setattr(OnnxTarget, "_run", buggy)
    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    rc = main(["validate", str(folder), *FAST, "--reference", "none", "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    rows = _rows(report)
    assert rc == 1 and report["verdict"] == "FAILED"
    assert rows["mb05_fp32.onnx"]["verdict"] == "PASSED"  # the other row is still scored and judged
    bug = rows["mb05_bug.onnx"]
    assert bug["status"] == "error" and bug["reason"].startswith("internal error: KeyError")
    log = Path(bug["crash_log"])
    assert log.parent == tmp_path / "cache" / "logs" and "Traceback (most recent call last)" in log.read_text()


# ---------------------------------------------------------------- default gates


def test_without_reference_a_garbage_model_fails_the_ceiling(onnx_fp32, tmp_path, capsys):
    """--reference none (the Pi workflow): the mean face drawn in every crop fails; the real model passes."""
    folder, rep = tmp_path / "out", tmp_path / "rep"
    _place(onnx_fp32["mb05"], folder, "mb05_fp32.onnx")
    _place(_constant_onnx(tmp_path / "mean.onnx", 0.0), folder, "mb05_meanface.onnx")
    rc = main(["validate", str(folder), *FAST, "--reference", "none", "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    rows = _rows(report)
    assert rc == 1 and report["verdict"] == "FAILED" and report["reference"] == "none"
    assert all(r["role"] == "artifact" for r in report["targets"])
    mean = rows["mb05_meanface.onnx"]
    assert mean["status"] == "ok" and _failed_gates(mean) == {"max_nme", "max_failure_rate"}
    assert mean["nme"]["balanced"] > 15  # far above the ceiling, not near it
    good = rows["mb05_fp32.onnx"]
    assert good["verdict"] == "PASSED" and {g["gate"] for g in good["gates"]} == {"max_nme", "max_failure_rate"}

    # --no-gates: nothing is judged, so nothing is verified (exit 1), and the report is still written
    rc = main(["validate", str(folder), *FAST, "--reference", "none", "--no-gates", "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    assert rc == 1 and _report(rep)["verdict"] == "NOT VERIFIED"
    _first_lines(rep, "NOT VERIFIED")


def test_a_different_model_under_a_manifest_fails_parity_even_when_it_scores_better(onnx_fp32, tmp_path, capsys):
    folder, rep = tmp_path / "out", tmp_path / "rep"
    # the MobileNet-V3 fixture's weights claiming to be mb05 (worse than mb05) ...
    _place(onnx_fp32["mbv3"], folder / "a", "mb05_fp32.onnx", model="mb05", arch="mobilenet_v1",
           source=_source("mb05"))
    # ... and mb05's weights claiming to be the fixture (better than the fixture)
    _place(onnx_fp32["mb05"], folder / "b", f"{MBV3_MODEL}_fp32.onnx", model=MBV3_MODEL, arch="mobilenet_v3",
           source=_source("mbv3_05_distilled"))
    rc = main(["validate", str(folder), *FAST, "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    rows = _rows(report)
    assert rc == 1 and report["verdict"] == "FAILED"
    assert sum(r["role"] == "reference" for r in report["targets"]) == 2  # each judged against its claimed source
    worse, better = rows["mb05_fp32.onnx"], rows[f"{MBV3_MODEL}_fp32.onnx"]
    assert worse["delta_vs_reference"]["balanced"] > 0 > better["delta_vs_reference"]["balanced"]
    for r in (worse, better):
        assert r["status"] == "ok" and r["verdict"] == "FAILED"
        assert {"max_abs_delta_nme", "max_landmark_px"} <= _failed_gates(r), r["gates"]
    assert "max_delta_nme" not in _failed_gates(better)  # a one-sided gate alone would have passed it
    assert all(r["verdict"] == "PASSED" for r in report["targets"] if r["role"] == "reference")


@pytest.fixture(scope="module")
def pal4(tmp_path_factory):
    """A real lossy artifact: mb05 as CoreML with 4-bit weight palettes (opt-in for being too lossy)."""
    pytest.importorskip("torch")
    pytest.importorskip("coremltools")
    from edge3dfa.converters import convert

    root = tmp_path_factory.mktemp("pal4")
    return convert("mb05", to="coreml", precision="pal4", out_dir=root, parity_count=8, verbose=False)[0].path


def test_a_lossy_artifact_beyond_the_goal_fails(pal4, tmp_path, capsys):
    folder, rep = pal4.parent, tmp_path / "rep"
    rc = main(["validate", str(folder), *FAST, "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    row = next(r for r in report["targets"] if r["role"] == "artifact")
    assert rc == 1 and report["verdict"] == "FAILED"
    assert row["delta_vs_reference"]["balanced"] > 0.10 and "max_delta_nme" in _failed_gates(row)

    # a gates file may say otherwise, for that precision only
    gates = tmp_path / "gates.toml"
    gates.write_text("[precision.pal4]\nmax_delta_nme = 50\nmax_delta_nme_bin = 50\n")
    rc = main(["validate", str(folder), *FAST, "--report-dir", str(rep), "--gates", str(gates)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    assert rc == 0 and report["verdict"] == "PASSED"
    assert report["gates"]["precision"]["pal4"]["max_delta_nme"] == 50 and report["gates"]["max_nme"] == 10

    # without a reference and without an fp32 of its format, a lossy artifact has nothing to be compared with
    rc = main(["validate", str(folder), *FAST, "--reference", "none", "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    row = report["targets"][0]
    assert rc == 1 and report["verdict"] == "NOT VERIFIED" and row["verdict"] == "NOT VERIFIED"
    assert {g["gate"] for g in row["gates"] if g["passed"] is None} == {"max_delta_nme", "max_delta_nme_bin"}


def test_a_gate_that_cannot_be_computed_is_not_verified(onnx_fp32, tmp_path, capsys):
    """3 faces leave a yaw bin empty: no balanced NME, so the ceiling is not checked -- never a PASSED."""
    folder, rep = tmp_path / "out", tmp_path / "rep"
    _place(onnx_fp32["mb05"], folder, "mb05_fp32.onnx")
    rc = main(["validate", str(folder), "--samples", "3", "--latency-runs", "0", "--reference", "none",
               "--report-dir", str(rep)])
    _clean(capsys.readouterr().err)
    report = _report(rep)
    assert rc == 1 and report["verdict"] == "NOT VERIFIED"
    assert 0 in report["dataset"]["bin_counts"].values()
    gate = next(g for g in report["targets"][0]["gates"] if g["gate"] == "max_nme")
    assert gate["passed"] is None and "yaw bin" in gate["note"]
    _first_lines(rep, "NOT VERIFIED")


def test_verdict_rules_on_hand_made_rows():
    from edge3dfa.validation.gates import row_verdict, verdict

    def row(status: str = "ok", role: str = "artifact", gates: tuple = (True,)) -> dict:
        r = {"status": status, "role": role, "gates": [{"passed": p} for p in gates]}
        return {**r, "verdict": row_verdict(r)}

    ok, bad, unchecked = row(), row(gates=(True, False)), row(gates=(True, None))
    assert [ok["verdict"], bad["verdict"], unchecked["verdict"]] == ["PASSED", "FAILED", "NOT VERIFIED"]
    assert row("error")["verdict"] == "FAILED" and row("skipped")["verdict"] == "NOT VERIFIED"
    assert row(gates=())["verdict"] == "NOT VERIFIED"  # nothing judged
    detector = row("not_applicable")
    assert detector["verdict"] is None
    assert verdict([ok, detector]) == "PASSED"
    assert verdict([detector]) == verdict([row(role="reference")]) == "NOT VERIFIED"  # no artifact judged
    assert verdict([ok, unchecked]) == verdict([ok, row("skipped")]) == "NOT VERIFIED"
    assert verdict([ok, unchecked, row("error")]) == verdict([bad, row("skipped")]) == "FAILED"


# ---------------------------------------------------------------- only the user skips


def _validate_without_onnxruntime(folder: Path, rep: Path, *extra: str) -> subprocess.CompletedProcess:
    """``edge3dfa validate`` in a fresh interpreter where ``import onnxruntime`` fails, as when it is not installed."""
    argv = ["validate", str(folder), *FAST, "--reference", "none", "--report-dir", str(rep), *extra]
    script = ("import sys\nsys.modules['onnxruntime'] = None  # import onnxruntime -> ImportError\n"
              f"import edge3dfa.cli as cli\nsys.exit(cli.main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ})


def test_a_runtime_not_installed_fails_unless_skipped_by_choice_then_not_verified(onnx_fp32, tmp_path):
    folder, rep = tmp_path / "out", tmp_path / "rep"
    _place(onnx_fp32["mb05"], folder, "mb05_fp32.onnx")
    r = _validate_without_onnxruntime(folder, rep)
    _clean(r.stderr)
    report = _report(rep)
    row = report["targets"][0]
    assert r.returncode == 1 and report["verdict"] == "FAILED"
    assert row["status"] == "error" and "onnxruntime" in row["reason"]
    assert r.stdout.splitlines()[0].startswith("Verdict: FAILED")

    r = _validate_without_onnxruntime(folder, rep, "--skip-unavailable")
    _clean(r.stderr)
    report = _report(rep)
    row = report["targets"][0]
    assert r.returncode == 1 and report["verdict"] == "NOT VERIFIED" and not report["passed"]
    assert row["status"] == "skipped" and "--skip-unavailable" in row["reason"]
    assert r.stdout.splitlines()[0].startswith("Verdict: NOT VERIFIED")


# ---------------------------------------------------------------- export: the plan, checked before any work


@pytest.mark.parametrize("args", [
    ["--precision", "int4"], ["--to", ","], ["--precision", ","], ["--to", "onnx", "--precision", "fp16"],
    ["--to", "tensorrt"], ["--nme-budget", "nan"], ["--nme-budget", "-1"], ["--nme-budget", "inf"],
    ["--to", "onnx", "--precision", "fp32", "--nme-budget", "0.05"], ["--calib-count", "0"],
    ["--max-nme", "nan"], ["--max-delta-nme", "-0.1"],
], ids=lambda a: " ".join(a))
def test_export_plan_that_cannot_be_met_is_exit_2_having_built_nothing(args, tmp_path, monkeypatch, capsys):
    import edge3dfa.converters as converters
    import edge3dfa.validation.datasets as datasets

    def work(*a, **k):  # noqa: ANN002, ANN003, ANN202 - any of these means work started: exit 3, not 2
        raise RuntimeError("work started before the plan was checked")

    monkeypatch.setattr(converters, "load_source", work)
    monkeypatch.setattr(converters, "convert", work)
    monkeypatch.setattr(datasets, "load_crops", work)
    out = tmp_path / "out"
    rc = main(["export", "--model", "mb05", "--out", str(out), *FAST, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("edge3dfa: error: ") and "Traceback" not in err
    assert not out.exists()


def test_export_asked_for_a_format_whose_extra_is_missing_is_exit_2(tmp_path, monkeypatch, capsys):
    import edge3dfa.validation.cli as vcli

    monkeypatch.setattr(vcli, "_missing_packages", lambda extra: ["coremltools"] if extra == "coreml" else [])
    rc = main(["export", "--to", "onnx,coreml", "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "--to coreml" in err and "coremltools" in err and not (tmp_path / "out").exists()


def test_export_says_what_it_did_not_attempt_and_a_failed_conversion_fails(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import edge3dfa.converters as converters
    import edge3dfa.validation.cli as vcli

    real = converters.convert

    def convert(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if k["precision"] == "dyn-int8":
            raise RuntimeError("converter bug half-way")
        return real(*a, **k)

    monkeypatch.setattr(vcli, "_missing_packages", lambda extra: [f"{extra}-framework"] if extra != "onnx" else [])
    monkeypatch.setattr(converters, "convert", convert)
    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["export", "--precision", "fp32,dyn-int8", "--parity-count", "8", "--out", str(out), *FAST])
    o, err = capsys.readouterr()
    _clean(err)
    report = _report(out / "mb05")
    assert rc == 1 and report["verdict"] == "FAILED" and o.splitlines()[0].startswith("Verdict: FAILED")
    assert {n["what"] for n in report["not_attempted"]} == {"tflite", "coreml", "executorch"}
    assert "not attempted: tflite" in err
    rows = {(r["format"], r["precision"], r["role"]): r for r in report["targets"]}
    assert rows[("onnx", "fp32", "artifact")]["verdict"] == "PASSED"
    bad = rows[("onnx", "dyn-int8", "artifact")]
    assert bad["status"] == "error" and "RuntimeError: converter bug half-way" in bad["reason"]
    assert Path(bad["crash_log"]).is_file()


def test_no_verify_gives_not_verified_even_when_every_gate_passes():
    """The rows of an artifact used with --no-verify may describe another file than its manifest claims."""
    from edge3dfa.validation.gates import NOT_VERIFIED, PASSED, row_verdict

    ok = {"status": "ok", "gates": [{"gate": "max_nme", "value": 3.8, "limit": 10.0, "passed": True}]}
    assert row_verdict({**ok, "manifest_verified": True}) == PASSED
    assert row_verdict({**ok, "manifest_verified": False}) == NOT_VERIFIED
