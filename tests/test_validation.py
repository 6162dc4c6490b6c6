"""Validation harness: metrics on hand-made cases, the published mb05 figure, and validate/export end to end."""

import base64
import json
import re
import shutil
import time
from math import sqrt
from pathlib import Path

import numpy as np
import pytest

from edge3dfa import assets
from edge3dfa.assets import sha256_file
from edge3dfa.cli import main
from edge3dfa.datasets import load_crops, select
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import Manifest, publish
from edge3dfa.measure import metrics
from edge3dfa.validation.gates import Limits, check, load_gates

# ---------------------------------------------------------------- metrics, hand-made cases


def _square_face(side: float = 100.0, n: int = 68) -> np.ndarray:
    """[1,2,n] points whose bounding box is exactly side x side (corners included)."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, side, (2, n))
    pts[:, :4] = [[0, side, 0, side], [0, 0, side, side]]
    return pts[None] + 50.0


def test_nme_of_a_5px_shift_on_a_100px_box_is_5_percent():
    gt = _square_face(100)
    pred = gt + np.array([3.0, 4.0])[None, :, None]  # 3-4-5 triangle: every point 5 px off
    assert metrics.nme(pred, gt) == pytest.approx([5.0])
    # a 50x200 box has the same sqrt(w*h) = 100
    gt2 = gt.copy()
    gt2[:, 0] = 50 + (gt[:, 0] - 50) * 0.5
    gt2[:, 1] = 50 + (gt[:, 1] - 50) * 2.0
    assert metrics.nme(gt2 + np.array([0.0, 5.0])[None, :, None], gt2) == pytest.approx([5.0])
    # a z row in either array is ignored (NME is 2-D)
    gt3 = np.concatenate([gt, np.full((1, 1, 68), 7.0)], axis=1)
    assert metrics.nme(np.concatenate([pred, np.zeros((1, 1, 68))], axis=1), gt3) == pytest.approx([5.0])


def test_nme_matches_upstream_loop_formula():
    """Against a per-face loop written as 3DDFA's benchmark_aflw2000.calc_nme (bbox from GT, sqrt(w*h))."""
    rng = np.random.default_rng(1)
    gt = rng.uniform(0, 300, (20, 2, 68))
    pred = gt + rng.normal(0, 4, gt.shape)
    want = []
    for p, g in zip(pred, gt):
        llength = sqrt((g[0].max() - g[0].min()) * (g[1].max() - g[1].min()))
        want.append(np.mean(np.sqrt(np.sum((p - g) ** 2, 0))) / llength * 100)
    np.testing.assert_allclose(metrics.nme(pred, gt), want, rtol=1e-12)


def test_yaw_bins_at_the_boundaries():
    yaw = [0, 30, -30, 30.001, 60, -60, 60.001, 89, 95, -351.2, 187.8]
    # 3DDFA: |yaw| <= 30, 30 < |yaw| <= 60, |yaw| > 60 (so > 90 lands in the last bin)
    assert metrics.yaw_bins(yaw).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_summary_balanced_mean_auc_and_failures_by_hand():
    errors = np.array([1.0, 3.0, 5.0, 6.0, 8.0, 12.0])
    yaw = np.array([0.0, 10.0, 45.0, 70.0, 80.0, -100.0])
    s = metrics.summarize(errors, yaw)
    assert s["bins"]["[0,30]"] == {"mean": 2.0, "count": 2}
    assert s["bins"]["(30,60]"] == {"mean": 5.0, "count": 1}
    assert s["bins"]["(60,90]"]["mean"] == pytest.approx(26 / 3)
    assert s["balanced"] == pytest.approx((2 + 5 + 26 / 3) / 3)
    assert s["mean"] == pytest.approx(35 / 6)
    assert s["failure10"] == pytest.approx(1 / 6)
    # an empty bin leaves the balanced mean undefined instead of silently averaging two bins
    assert metrics.summarize(errors[:2], yaw[:2])["balanced"] is None


def test_ced_and_auc_on_a_hand_made_curve():
    errors = np.array([0.0, 3.5, 7.0, 14.0])
    assert metrics.ced(errors, [0, 3.4, 3.5, 5, 7, 20]).tolist() == [0.25, 0.25, 0.5, 0.5, 0.75, 1.0]
    # CED is 1/4 on [0,3.5), 1/2 on [3.5,7): area 0.25*3.5 + 0.5*3.5 = 2.625, over 7 -> 0.375
    assert metrics.auc(errors, 7.0) == pytest.approx(0.375)
    # and the same from a finely sampled curve (trapezoid rule)
    t = np.linspace(0, 7, 70001)
    assert np.trapezoid(metrics.ced(errors, t), t) / 7 == pytest.approx(0.375, abs=1e-4)
    assert metrics.failure_rate(errors, 10.0) == 0.25


def test_subset_is_evenly_spaced_and_deterministic():
    idx = select(5)
    assert idx[0] == 0 and idx[-1] == 1999 and len(idx) == 5
    assert np.all(np.abs(np.diff(idx) - 1999 / 4) <= 1)
    assert np.array_equal(select(300), select("300"))
    assert len(select("all")) == 2000 and len(select(5000)) == 2000
    for bad in (0, -3, "many"):
        with pytest.raises(Edge3dfaError):
            select(bad)


def test_gates_toml_overrides_and_checks(tmp_path):
    f = tmp_path / "gates.toml"
    f.write_text("max_delta_nme = 0.1\nmax_param_err = 0.05\n[precision.int8]\nmax_delta_nme = 0.3\n"
                 "[format.tflite]\nmax_param_err = 0.2\n")
    g = load_gates(f)
    assert g.limits_for("onnx", "fp32") == Limits(max_delta_nme=0.1, max_param_err=0.05)
    assert g.limits_for("tflite", "int8") == Limits(max_delta_nme=0.3, max_param_err=0.2)
    row = {"role": "artifact", "nme": {"balanced": 3.9, "failure10": 0.01},
           "delta_vs_reference": {"balanced": 0.2, "bins": {}}, "parity": {"param_max_abs": 0.1}}
    res = {r["gate"]: r["passed"] for r in check(row, g.limits_for("onnx", "int8"))}
    assert res == {"max_delta_nme": True, "max_param_err": False}
    for text in ("max_delta = 1\n", "max_nme = 'x'\n", "max_nme = [\n"):
        f.write_text(text)
        with pytest.raises(Edge3dfaError, match="gates.toml"):
            load_gates(f)


def test_default_gates_catch_a_broken_conversion():
    from edge3dfa.validation.gates import DEFAULT_GATES

    def passed(precision: str, delta: float, px: float = 0.0, bin_delta: float | None = None,
               nme: float = 4.0, fail: float = 0.01) -> bool:
        bins = {"a": delta, "b": delta if bin_delta is None else bin_delta}
        row = {"role": "artifact", "precision": precision, "nme": {"balanced": nme, "failure10": fail},
               "delta_vs_reference": {"balanced": delta, "bins": bins}, "parity": {"landmark_max_px": px}}
        return all(r["passed"] for r in check(row, DEFAULT_GATES.limits_for("onnx", precision)))

    # lossless: two-sided, to the hundredth of a point and half a crop pixel
    assert passed("fp32", 0.0) and passed("fp16", 0.01, px=0.2)
    assert not passed("fp32", 0.05) and not passed("fp16", -0.05) and not passed("fp32", 0.0, px=2.0)
    # lossy: the project's goal, one-sided (better than the reference is never a failure)
    assert passed("int8", 0.08) and passed("int8", -0.3) and passed("w8a8", 0.05, bin_delta=0.19)
    assert not passed("int8", 0.12) and not passed("w8a8", 0.05, bin_delta=0.25) and not passed("pal4", 1200.0)
    # the ceiling, whatever the precision
    assert not passed("fp32", 0.0, nme=12.0) and not passed("int8", 0.0, fail=0.3)


def test_every_report_row_field_is_in_the_report_schema():
    """report.json's targets are Row.to_dict() in field order: each field must be documented by the schema text
    (report.py's docstring is the format's specification), and a misspelt field must fail loudly."""
    from dataclasses import fields

    from edge3dfa.validation import report
    from edge3dfa.validation.rows import Row

    schema = report.__doc__.split("targets ", 1)[1]
    missing = [f.name for f in fields(Row) if not re.search(rf"\b{f.name}\b", schema)]
    assert missing == []
    row = Row(key="m/onnx/x.onnx", role="artifact", model="m", format="onnx", precision="fp32")
    assert list(row.to_dict()) == [f.name for f in fields(Row)] and row.to_dict()["status"] == "ok"
    with pytest.raises(TypeError):
        Row(key="k", role="artifact", model="m", format="onnx", precision="fp32", nme_balanced=3.0)
    failed = row.failed("conversion failed: x")
    assert (failed.status, failed.reason, row.status) == ("error", "conversion failed: x", "ok")


def test_latency_timing_runs_and_budget():
    from edge3dfa.measure.timing import MIN_RUNS, time_calls

    calls = []

    def nap() -> None:
        calls.append(1)
        time.sleep(0.02)

    r = time_calls(nap, warmup=2, runs=5)
    assert r["runs"] == 5 and len(calls) == 7 and 20 <= r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    calls.clear()
    r = time_calls(nap, warmup=50, runs=200, budget_s=0.1)  # budget: 10 timed runs, warm-up cut at 0.05 s
    assert r["runs"] == MIN_RUNS and len(calls) <= MIN_RUNS + 4


def test_full_protocol_bin_counts():
    yaw = np.load(assets.fetch("aflw2000_pose"))
    assert np.bincount(metrics.yaw_bins(yaw)).tolist() == [1312, 383, 305]  # 3DDFA "current" split


# ---------------------------------------------------------------- the published mb05 figure

PUBLISHED_MB05 = {"[0,30]": 2.93, "(30,60]": 3.67, "(60,90]": 4.79}  # community re-evaluation (PROVENANCE)


@pytest.mark.slow
def test_mb05_pytorch_reproduces_the_published_aflw2000_figure():
    pytest.importorskip("torch")
    from edge3dfa.measure.predict import predict_all
    from edge3dfa.target import open_target

    t0 = time.perf_counter()
    data = load_crops("all")
    params = predict_all(open_target("mb05", threads=1), data.inputs)
    from edge3dfa import runtime

    s = metrics.summarize(metrics.nme(runtime.landmarks(params, data.roi_boxes), data.gt), data.yaw)
    took = time.perf_counter() - t0
    bins = {k: round(v["mean"], 3) for k, v in s["bins"].items()}
    print(f"\nmb05 torch, all 2000 AFLW2000-3D crops: {bins}, balanced {s['balanced']:.3f}, mean {s['mean']:.3f}, "
          f"AUC7 {s['auc7']:.3f}, fail>10% {s['failure10']:.3%}; {took:.1f} s, 1 thread (shared 2-core machine)")
    assert [v["count"] for v in s["bins"].values()] == [1312, 383, 305]
    for k, want in PUBLISHED_MB05.items():
        assert s["bins"][k]["mean"] == pytest.approx(want, abs=0.02), k
    assert s["balanced"] == pytest.approx(3.80, abs=0.02)
    assert s["mean"] == pytest.approx(3.35, abs=0.02)


# ---------------------------------------------------------------- validate / export end to end


def _torch_artifact(folder: Path) -> Path:
    """A legitimate artifact for the harness: the checkpoint copied beside a 'torch' manifest."""
    src = assets.fetch("mb05")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".copy.pth"
    shutil.copy(src, tmp)
    m = Manifest(artifact="mb05_fp32.pth", format="torch", precision="fp32", model="mb05", arch="mobilenet_v1",
                 source={"path": str(src), "sha256": sha256_file(src), "widen_factor": 0.5})
    return publish(tmp, folder / "mb05_fp32.pth", m)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """out/mb05 with the torch copy, plus ONNX fp32 when the ONNX converter is installed."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("out")
    _torch_artifact(root / "mb05" / "torch")
    from edge3dfa.converters import convert, get_format

    try:
        get_format("onnx")
    except Edge3dfaError:
        return root / "mb05", None  # the onnx extra is not installed: the torch artifact only
    onnx = convert("mb05", to="onnx", precision="fp32", out_dir=root, parity_count=8, verbose=False)[0].path
    return root / "mb05", onnx


FAST = ["--samples", "60", "--latency-runs", "3", "--latency-warmup", "1", "--latency-batch", "1,4"]


@pytest.mark.slow
def test_validate_writes_reports_and_gates_set_the_exit_code(artifacts, tmp_path, capsys):
    folder, onnx = artifacts
    rep = tmp_path / "rep"
    assert main(["validate", str(folder), *FAST, "--report-dir", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["schema"] == "edge3dfa.report/2" and report["passed"] and report["verdict"] == "PASSED"
    # lossless precisions: |ΔNME| vs the reference, landmark parity, and a phone bundle vs its params artifact
    # within the issue-17 goal (±0.005 at fp32)
    lossless = {"max_abs_delta_nme": 0.02, "max_landmark_px": 0.5, "max_bundle_delta_nme": 0.005}
    assert report["gates"] == {"max_delta_nme": 0.1, "max_delta_nme_bin": 0.2, "max_nme": 10.0,
                               "max_failure_rate": 0.1, "precision": {"fp32": lossless, "fp16": lossless}}
    assert report["dataset"]["count"] == 60 and len(report["dataset"]["files"]) == 60
    rows = {r["key"]: r for r in report["targets"]}
    ref, copy = rows["mb05/torch/reference"], rows["mb05/torch/mb05_fp32.pth"]
    assert copy["status"] == "ok" and copy["parity"]["param_max_abs"] == 0.0
    assert copy["per_face"] == ref["per_face"] and len(ref["per_face"]) == 60
    assert copy["delta_vs_reference"]["balanced"] == 0.0
    assert {g["gate"] for g in copy["gates"]} == {"max_nme", "max_failure_rate", "max_delta_nme",
                                                  "max_delta_nme_bin", "max_abs_delta_nme", "max_landmark_px"}
    assert all(g["passed"] for g in copy["gates"]) and copy["verdict"] == "PASSED"
    assert {(x["batch"], x["threads"]) for x in copy["latency"]} >= {(1, 1), (4, 1)}
    assert all(x["runs"] == 3 and x["median_ms"] > 0 for x in copy["latency"])
    assert ref["nme"]["balanced"] == pytest.approx(float(np.mean([b["mean"] for b in ref["nme"]["bins"].values()])))
    if onnx is not None:
        o = rows[f"mb05/onnx/{onnx.name}"]
        with capsys.disabled():
            print(f"\nONNX fp32 vs torch on 60 faces: ΔNME {o['delta_vs_reference']}, parity {o['parity']}")
        assert o["status"] == "ok" and abs(o["delta_vs_reference"]["balanced"]) < 0.01
        assert o["parity"]["param_max_abs"] < 1e-3
    md = (rep / "report.md").read_text()
    assert "mb05 torch (reference)" in md and "NME [0,30]" in md and "![ced](report_ced.png)" in md
    page = (rep / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 4 and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert not re.search(r'src="(?!data:)', page)  # self-contained

    # a strict gate from a TOML file fails -> exit 1, and the report still says which gate
    gates = tmp_path / "gates.toml"
    gates.write_text("[format.torch]\nmax_nme = 1.0\n")
    assert main(["validate", str(folder), *FAST, "--report-dir", str(rep), "--gates", str(gates)]) == 1
    report = json.loads((rep / "report.json").read_text())
    assert not report["passed"] and report["verdict"] == "FAILED"
    failed = [g for t in report["targets"] for g in t["gates"] if not g["passed"]]
    assert failed and all(g["gate"] == "max_nme" for g in failed)
    assert "Verdict: FAILED" in capsys.readouterr().err


@pytest.mark.slow
def test_validate_without_reference_scores_artifacts_alone(artifacts, tmp_path):
    folder, _ = artifacts
    args = ["validate", str(folder), "--samples", "30", "--latency-runs", "0", "--report-dir", str(tmp_path)]
    assert main([*args, "--reference", "none"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "PASSED" and report["reference"] == "none"
    assert report["targets"] and all(t["role"] == "artifact" for t in report["targets"])
    assert all(t["delta_vs_reference"] is None and t["parity"] is None for t in report["targets"])
    assert all(t["nme"]["count"] == 30 for t in report["targets"])


def test_validate_bad_inputs_exit_2_naming_the_file(tmp_path, capsys):
    pytest.importorskip("torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate", str(empty), "--samples", "5"]) == 2
    assert "no edge3dfa artifacts" in capsys.readouterr().err

    altered = tmp_path / "altered"
    art = _torch_artifact(altered)
    art.chmod(0o644)
    with open(art, "ab") as f:
        f.write(b"\0")
    assert main(["validate", str(altered), "--samples", "5"]) == 2
    assert "mb05_fp32.pth changed since conversion" in capsys.readouterr().err

    orphan = tmp_path / "orphan"
    art = _torch_artifact(orphan)
    (orphan / "mb05_fp32.json").unlink()
    assert main(["validate", str(orphan), "--samples", "5"]) == 2
    assert "mb05_fp32.pth has no manifest" in capsys.readouterr().err

    good = tmp_path / "good"
    _torch_artifact(good)
    crops = tmp_path / "crops"
    shutil.copytree(assets.fetch("aflw2000_crops"), crops)
    missing = assets.fetch("aflw2000_crop_list").read_text().split()[select(5)[2]]
    (crops / missing).unlink()
    assert main(["validate", str(good), "--samples", "5", "--crops-dir", str(crops), "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err
    assert "image missing" in err and missing in err
    assert not (good / "report.json").exists()  # nothing half-written


@pytest.mark.slow
def test_export_converts_validates_and_reports(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    # the cheapest run that still goes through the whole command: one precision of one format
    to = ["--to", "onnx", "--precision", "fp32"]
    rc = main(["export", "--model", "mb05", *to, "--out", str(tmp_path), *FAST, "--max-delta-nme", "0.1"])
    report = json.loads((tmp_path / "mb05" / "report.json").read_text())
    assert rc == 0 and report["passed"] and report["verdict"] == "PASSED" and report["not_attempted"] == []
    assert report["targets"][0]["role"] == "reference" and report["targets"][0]["status"] == "ok"
    assert any(t["format"] == "onnx" and t["status"] == "ok" for t in report["targets"])
    assert report["gates"]["command_line"] == {"max_delta_nme": 0.1}
