"""Phone bundles through the commands: --bundle parsing and refusals, the roi mapping the app does, the report's
"Phone bundles" section and its gate, and (slow: converts) export --bundle scoring a bundle from its own landmarks
and run --artifact on a bundle."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli
from test_report import _build, _row
from test_toy_format import TOY

from edge3dfa import bundle, runtime
from edge3dfa.cli import main
from edge3dfa.errors import Edge3dfaError
from edge3dfa.validation import report
from edge3dfa.validation.gates import BUNDLE_DELTA_NME

# ---------------------------------------------------------------- the roi mapping


def test_to_photo_is_what_the_runtime_gives_for_any_roi() -> None:
    """The app's two lines (bundle.to_photo) on the spec's crop-pixel landmarks equal runtime.landmarks for the roi
    (the numpy pipeline's own mapping, upstream's similar_transform): an independent path to the same pixels."""
    params = np.random.default_rng(3).normal(0, 0.5, (5, 62)).astype(np.float32)
    roi = np.array([[10.0, 20.0, 250.0, 260.0], [-30, -5, 90, 115], [100, 100, 400, 400], [0, 0, 60, 60],
                    [7.5, 3.25, 127.5, 123.25]])
    got = bundle.to_photo(bundle.reference(params)["landmarks"], roi)
    np.testing.assert_allclose(got, runtime.landmarks(params, roi).transpose(0, 2, 1), atol=2e-3)
    with pytest.raises(Edge3dfaError, match="one roi per face"):
        bundle.to_photo(got, roi[:2])


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv,says", [
    (["convert", "--bundle", "--option", "bundle.channels=xyz"], "not one of bgr, rgb"),
    (["convert", "--option", "bundle.channels=rgb"], "bundle options need --bundle"),
    (["convert", "--bundle", "--option", "bundle.chanels=rgb"], "unknown bundle option"),
    (["convert", "--bundle", "--precision", "int8", "--nme-budget", "0.05"], "not phone bundles"),
])
def test_bad_bundle_options_are_one_line_and_exit_2(argv, says, tmp_path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_format_without_bundles_is_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    """The toy format (tests/toyformat) does not set Format.bundles: convert refuses, export has nothing to bundle."""
    monkeypatch.syspath_prepend(str(TOY))
    for cmd in ("convert", "export"):
        assert main([cmd, "--to", "toy", "--bundle", "--out", str(tmp_path / cmd)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "toy does not build phone bundles" in err[0], err
    assert not any(tmp_path.iterdir())


def test_list_options_lists_the_bundle_option(capsys) -> None:
    assert main(["convert", "--to", "onnx", "--list-options"]) == 0
    out = capsys.readouterr().out
    assert "bundle.channels=bgr  [bgr|rgb]" in out and "builds phone bundles" in out


def test_export_plans_a_bundle_per_format_that_bundles_and_lists_the_others() -> None:
    from edge3dfa.converters import get_format
    from edge3dfa.workflows.export import plan_bundles

    class NoBundles:
        name, bundles = "plain", False
        Options = get_format("onnx").Options

        def check_bundle(self, precision, detector, options):
            raise Edge3dfaError("plain does not build phone bundles (--bundle)")

    onnx = get_format("onnx")
    take, skip = plan_bundles([(onnx, ["fp32"]), (NoBundles(), ["fp32", "int8"])], {"onnx": {}, "plain": {}})
    assert [(f.name, p) for f, p in take] == [("onnx", ["fp32"])]
    assert [s["what"] for s in skip] == ["plain fp32 bundle", "plain int8 bundle"]
    assert all("does not build phone bundles" in s["reason"] for s in skip)
    with pytest.raises(Edge3dfaError, match="no planned format and precision builds phone bundles"):
        plan_bundles([(NoBundles(), ["fp32"])], {"plain": {}})


# ---------------------------------------------------------------- the report


def _bundle_row(params: dict, delta: float, ms: float, size: int) -> dict:
    """A bundle row as the harness returns it, ``delta`` NME points above its params artifact ``params``."""
    row = _row("onnx", "fp32", ms=ms, size=size, delta=delta)
    name = "mb05_fp32_bundle.onnx"
    row.update(key=f"mb05/onnx/{name}", artifact=f"onnx/{name}", bundle={
        "contract_version": 1, "channel_order": "RGB", "layout": "NHWC", "vs_params": {
            "key": params["key"], "artifact": params["artifact"],
            "delta": {"balanced": delta, "mean": delta, "bins": {}}},
        "spec_parity": {"aflw2000": {"bundle_landmark_mean_px": 2e-5, "bundle_landmark_max_px": 6e-5,
                                     "pose_max_deg": 3e-5}}})
    return row


@pytest.mark.parametrize("delta,verdict", [(BUNDLE_DELTA_NME / 2, "PASSED"), (BUNDLE_DELTA_NME * 2, "FAILED")])
def test_phone_bundles_section_and_its_gate(delta, verdict, tmp_path) -> None:
    """A bundle whose NME departs from its params artifact's by more than the gate fails the report; the section
    gives NME, size and latency against the params artifact, and the parity vs the spec, in json, md and html."""
    params = _row("onnx", "fp32", ms=1.0, size=3_400_000)
    rep = _build([params, _bundle_row(params, delta, ms=1.25, size=3_468_000)])
    assert rep["verdict"] == verdict
    (b,) = rep["bundles"]
    assert b["gate"]["gate"] == "max_bundle_delta_nme" and b["gate"]["passed"] is (verdict == "PASSED")
    assert b["size_increase_bytes"] == 68_000 and b["size_increase_pct"] == pytest.approx(2.0)
    assert b["latency_increase_pct"] == pytest.approx(25.0) and b["params_latency_ms"] == 1.0
    assert b["spec_landmark_max_px"] == 6e-5 and b["params_key"] == params["key"]
    report.write(rep, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "## Phone bundles" in md and "<h2>Phone bundles</h2>" in page and "+25%" in md and "+2.0%" in page
    assert json.loads((tmp_path / "report.json").read_text())["bundles"][0]["key"] == b["key"]
    ship = {(e["format"], e["bundle"]): e for e in rep["recommended"]}  # a bundle is recommended on its own
    assert ship[("onnx", False)]["artifact"] == "onnx/mb05_fp32.onnx"
    assert (ship[("onnx", True)]["artifact"] == "onnx/mb05_fp32_bundle.onnx") is (verdict == "PASSED")


# ---------------------------------------------------------------- end to end (converts)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export --bundle of mb05 to ONNX fp32 on 100 faces: the params artifact, its bundle, one report."""
    out = tmp_path_factory.mktemp("export")
    proc = run_cli("export", "--model", "mb05", "--to", "onnx", "--precision", "fp32", "--bundle", "--no-detector",
                   "--samples", "100", "--latency-batch", "1", "--latency-budget", "0.2", "--parity-count", "8",
                   "--out", out)
    return out, proc


@pytest.mark.slow
def test_export_bundle_scores_the_bundle_from_its_landmarks(exported) -> None:
    """The bundle row's NME comes from its own landmark output and equals its params artifact's within the gate
    on ~100 faces; the report has the section, the printed Next names the bundle file."""
    out, proc = exported
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((out / "mb05" / "report.json").read_text())
    rows = {t["key"]: t for t in rep["targets"]}
    bun, par = rows["mb05/onnx/mb05_fp32_bundle.onnx"], rows["mb05/onnx/mb05_fp32.onnx"]
    assert bun["nme"]["count"] == par["nme"]["count"] == 100
    assert abs(bun["nme"]["balanced"] - par["nme"]["balanced"]) <= BUNDLE_DELTA_NME
    assert bun["bundle"]["vs_params"]["key"] == par["key"] and bun["verdict"] == "PASSED"
    assert any(g["gate"] == "max_bundle_delta_nme" and g["passed"] for g in bun["gates"])
    assert rep["bundles"][0]["latency_ms"] is not None and rep["bundles"][0]["params_latency_ms"] is not None
    assert "## Phone bundles" in (out / "mb05" / "report.md").read_text()
    assert "--artifact " + str(out / "mb05" / "onnx" / "mb05_fp32_bundle.onnx") in proc.stdout


@pytest.mark.slow
def test_run_artifact_on_a_bundle_gives_the_params_artifacts_faces(exported, tmp_path) -> None:
    """edge3dfa run --artifact BUNDLE on a photo: the pipeline's predict works on a bundle, and its landmarks and
    pose equal those of the params artifact of the same network (a different code path: numpy post-processing)."""
    out, _ = exported
    from edge3dfa import assets

    photo = assets.fetch("trump_hillary")
    got = {}
    for name in ("mb05_fp32_bundle.onnx", "mb05_fp32.onnx"):
        dest = tmp_path / name
        proc = run_cli("run", photo, "--artifact", out / "mb05" / "onnx" / name, "--out-dir", dest)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[name] = json.loads((dest / "trump_hillary.json").read_text())
    faces_b, faces_p = (got[n]["faces"] for n in got)
    assert len(faces_b) == len(faces_p) == 2
    for fb, fp in zip(faces_b, faces_p):
        np.testing.assert_allclose(np.asarray(fb["landmarks"]), np.asarray(fp["landmarks"]), atol=0.05)
        for angle, value in fp["pose_deg"].items():
            assert abs(fb["pose_deg"][angle] - value) <= 0.05, (angle, fb["pose_deg"], fp["pose_deg"])
    assert os.path.exists(tmp_path / "mb05_fp32_bundle.onnx" / "trump_hillary_overlay.png")
