"""The report's verdict-first layout: what to ship per format (report.json ``recommended``, the HTML's first table,
the terminal summary), the gates as a table, the verdict column first.

Cheap: hand-built report rows, no conversion. Which rows pass is decided by the real gates (``build`` runs
``DEFAULT_GATES`` on the rows' ΔNME and parity), never written into the rows by hand; which one is recommended is
written here from the rule (issue 19: the fastest that passes, ties to the smaller, FAILED / NOT VERIFIED never).
"""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from edge3dfa.measure import metrics
from edge3dfa.validation import report
from edge3dfa.validation.detectors import DetectorRow
from edge3dfa.validation.gates import DEFAULT_GATES, LOSSY_DELTA_NME
from edge3dfa.validation.plots import pareto
from edge3dfa.validation.recommend import recommend
from edge3dfa.validation.rows import Row

N = 12  # faces
YAW = np.array([5.0, 10, 20, 25, 40, 45, 50, 55, 70, 75, 80, 85])  # four per bin


def _row(fmt: str, precision: str, *, ms: float | None = 1.0, size: int = 1_000_000, delta: float = 0.0,
         role: str = "artifact", status: str = "ok", verified: bool = True, model: str = "mb05") -> dict:
    """A scored row as the harness returns it: NME 3.8 + ``delta`` in every bin, latency ``ms`` at b1 1t."""
    name = f"{model}_{precision}.{fmt}"
    base = {"key": f"{model}/{fmt}/{name}" if role == "artifact" else f"{model}/torch/reference", "role": role,
            "status": status, "reason": None if status == "ok" else "could not open it", "model": model,
            "format": fmt, "precision": precision, "runtime": fmt, "artifact": f"{fmt}/{name}",
            "manifest": f"{fmt}/{model}_{precision}.json", "size_bytes": size, "source_sha256": "0" * 64,
            "manifest_verified": verified, "nme": None, "per_face": None, "delta_vs_reference": None,
            "delta_vs_fp32": None, "parity": None, "parity_vs_fp32": None, "latency_note": None,
            "latency": [] if ms is None else [{"threads": 1, "batch": 1, "median_ms": ms, "p90_ms": ms * 3,
                                               "min_ms": ms / 2, "per_image_ms": ms, "runs": 50},
                                              {"threads": 2, "batch": 8, "median_ms": ms, "p90_ms": ms,
                                               "min_ms": ms, "per_image_ms": ms / 80, "runs": 50}]}
    if status != "ok":
        return base
    nme = 3.8 + delta
    bins = {b: {"mean": nme + k * 0.5, "count": 4} for k, b in enumerate(metrics.BIN_LABELS)}
    balanced = float(np.mean([v["mean"] for v in bins.values()]))
    base.update(nme={"bins": bins, "balanced": balanced, "mean": balanced, "median": nme, "auc7": 0.5,
                     "failure10": 0.0, "count": N},
                per_face=np.full(N, nme))
    if role == "artifact":
        base.update(delta_vs_reference={"balanced": delta, "mean": delta, "bins": dict.fromkeys(bins, delta)},
                    parity={"param_max_abs": 0.01, "landmark_max_px": 0.1 if precision == "fp32" else 2.0,
                            "param_mean_abs": 0.001, "landmark_mean_px": 0.05, "n": N})
    return base


def _build(rows: list[dict], not_attempted: list[dict] | None = None, detectors: list | None = None) -> dict:
    """report.build on the rows (real gates decide each verdict) with the PyTorch reference first; ``detectors``:
    the DetectorRows export adds (validation.detectors)."""
    data = SimpleNamespace(yaw=YAW, files=[f"img{i}.jpg" for i in range(N)],
                           describe=lambda: {"name": "AFLW2000-3D crops", "mode": "crops", "ground_truth": "original",
                                             "count": N, "subset": f"{N} of 2000", "missed": [], "source": "test"})
    ref = _row("torch", "fp32", ms=30.0, role="reference")
    models = {"0" * 64: {"name": "mb05", "arch": "mobilenet_v1", "checkpoint": "x", "sha256": "0" * 64,
                         "params": 850000, "macs": 46500000}}
    targets = [Row(**r) for r in (ref, *rows)]  # the harness's record; a misspelt key fails here
    return report.build({"models": models, "targets": targets, "detectors": detectors or []}, data, DEFAULT_GATES,
                        not_attempted,
                        tool_packages=())


def _pick(rep: dict, fmt: str) -> dict:
    (entry,) = [e for e in rep["recommended"] if e["format"] == fmt]
    return entry


FAILING = LOSSY_DELTA_NME * 2  # a lossy artifact this far above the reference fails max_delta_nme


# ---------------------------------------------------------------- the rule


def test_the_fastest_passing_artifact_of_each_format_is_recommended_with_its_figures():
    rep = _build([_row("onnx", "fp32", ms=0.90, size=3_400_000), _row("onnx", "int8", ms=0.51, size=1_100_000),
                  _row("onnx", "dyn-int8", ms=2.40, size=900_000),
                  _row("tflite", "fp32", ms=1.07, size=3_400_000), _row("tflite", "int8", ms=0.50, size=1_150_000)])
    assert rep["verdict"] == "PASSED"
    assert [(e["format"], e["precision"]) for e in rep["recommended"]] == [("onnx", "int8"), ("tflite", "int8")]
    onnx = _pick(rep, "onnx")
    assert onnx["artifact"] == "onnx/mb05_int8.onnx" and onnx["latency_ms"] == 0.51 and onnx["size_bytes"] == 1_100_000
    assert onnx["nme"] == pytest.approx(4.3) and onnx["delta_nme"] == 0.0  # 3.8, 4.3, 4.8 per bin
    assert onnx["worst_bin"] == {"bin": "(60,90]", "nme": pytest.approx(4.8)}
    assert onnx["command"] == "edge3dfa run photo.jpg --artifact onnx/mb05_int8.onnx"
    assert onnx["passed"] == onnx["judged"] == 3 and onnx["reason"] is None


def test_a_tie_at_the_shown_resolution_goes_to_the_smaller_file_and_no_tie_to_the_faster():
    rep = _build([_row("onnx", "fp32", ms=0.504, size=3_000_000), _row("onnx", "int8", ms=0.496, size=1_000_000),
                  _row("tflite", "fp32", ms=0.50, size=3_000_000), _row("tflite", "int8", ms=0.51, size=1_000_000)])
    assert _pick(rep, "onnx")["precision"] == "int8"  # both 0.50 ms: the smaller
    assert "tied with 1 other" in _pick(rep, "onnx")["chosen_by"]
    assert _pick(rep, "tflite")["precision"] == "fp32"  # 0.50 < 0.51: the faster, though 3x larger


def test_failed_and_not_verified_artifacts_are_never_recommended_however_fast():
    rep = _build([_row("onnx", "int8", ms=0.1, size=500_000, delta=FAILING),  # fails max_delta_nme
                  _row("onnx", "dyn-int8", ms=0.2, size=500_000, verified=False),  # --no-verify: NOT VERIFIED
                  _row("onnx", "w8", ms=0.3, status="skipped"),  # runtime missing: NOT VERIFIED
                  _row("onnx", "fp32", ms=5.0, size=3_000_000)])
    verdicts = {r["precision"]: r["verdict"] for r in rep["targets"] if r["role"] == "artifact"}
    assert verdicts == {"int8": "FAILED", "dyn-int8": "NOT VERIFIED", "w8": "NOT VERIFIED", "fp32": "PASSED"}
    onnx = _pick(rep, "onnx")
    assert onnx["precision"] == "fp32" and onnx["passed"] == 1 and onnx["judged"] == 4


def test_a_format_with_no_passing_artifact_says_so_and_recommends_nothing():
    rep = _build([_row("onnx", "int8", ms=0.5), _row("coreml", "w8a8", ms=None, delta=FAILING),
                  _row("coreml", "fp32", status="error")],
                 not_attempted=[{"what": "executorch", "reason": "the executorch extra is not installed"},
                                {"what": "onnx fp16", "reason": "opt-in: ask for it with --precision fp16"}])
    assert rep["verdict"] == "FAILED"
    coreml = _pick(rep, "coreml")
    assert coreml["artifact"] is None and coreml["command"] is None and coreml["passed"] == 0
    assert "none of its 2 artifact(s) passed (2 FAILED)" in coreml["reason"] and "nothing to ship" in coreml["reason"]
    et = _pick(rep, "executorch")
    assert et["artifact"] is None and et["reason"] == "not attempted: the executorch extra is not installed"
    assert _pick(rep, "onnx")["precision"] == "int8"  # a left-out precision does not hide the format's entry


def test_passing_artifacts_without_latency_are_chosen_by_size_and_say_so():
    rows = [_row("coreml", "fp32", ms=None, size=3_400_000), _row("coreml", "w8", ms=None, size=900_000)]
    rows[1]["latency_note"] = "evaluated in numpy: not a device's speed"
    rep = _build(rows)
    coreml = _pick(rep, "coreml")
    assert coreml["precision"] == "w8" and coreml["latency_ms"] is None
    assert coreml["chosen_by"].startswith("smallest passing: latency not measured")
    # a timed passing artifact beats an untimed one: its speed is known
    timed = recommend([{**r, "verdict": "PASSED"} for r in (_row("onnx", "fp32", ms=9.0, size=9_000_000),
                                                           _row("onnx", "int8", ms=None, size=1))])
    assert timed[0]["precision"] == "fp32"


def test_each_model_gets_its_own_recommendations():
    rep = _build([_row("onnx", "int8", ms=0.5), _row("onnx", "int8", ms=0.2, model="mbv3"),
                  _row("onnx", "fp32", ms=0.4, model="mbv3")])
    assert [(e["model"], e["precision"]) for e in rep["recommended"]] == [("mb05", "int8"), ("mbv3", "int8")]


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    pts = [(1.0, 3.8), (0.5, 3.9), (2.0, 3.7), (1.5, 3.85), (0.5, 4.0), (3.0, 3.7)]
    assert pareto(pts) == [1, 0, 2]  # (1.5, 3.85) is beaten by (1.0, 3.8); (0.5, 4.0) by (0.5, 3.9)


# ---------------------------------------------------------------- where it is shown


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and the order of tables among headings."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report with a failed row and an untested format, written once (plots included)."""
    int8 = _row("onnx", "int8", ms=0.5, size=1_100_000)
    int8["quantization"] = {  # as convert --nme-budget --sensitivity records it: the budget and sensitivity tables
        "budget": {"nme": 0.05, "bin_nme": 0.1}, "met": True, "chosen": "mixed", "float_layers": ["conv1"],
        "delta": {"balanced": 0.01, "bins": dict.fromkeys(metrics.BIN_LABELS, 0.02)}, "latency_ms": 0.5,
        "fp32_latency_ms": 0.9, "seconds": 12.0,
        "sensitivity": [{"layer": "conv1", "index": 0, "gain": 0.03, "nme_alone_float": 3.81, "sqnr_db": 20.0},
                        {"layer": "fc", "index": 1, "gain": 0.001, "nme_alone_float": 3.84, "sqnr_db": None}]}
    rep = _build([_row("onnx", "fp32", ms=0.9, size=3_400_000), int8,
                  _row("tflite", "int8", ms=0.4, size=1_100_000, delta=FAILING)],
                 not_attempted=[{"what": "executorch", "reason": "the executorch extra is not installed"}])
    out = tmp_path_factory.mktemp("rep")
    report.write(rep, out)
    return rep, out


def test_report_json_carries_the_recommendations(written):
    rep, out = written
    saved = json.loads((out / "report.json").read_text())
    assert saved["recommended"] == rep["recommended"]
    assert [(e["format"], e["precision"]) for e in saved["recommended"]] == [("onnx", "int8"), ("tflite", None),
                                                                             ("executorch", None)]


def test_the_html_opens_with_the_verdict_then_the_recommendation_table(written):
    _, out = written
    page = (out / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    assert body.startswith("<p class=") and "Verdict: FAILED (" in body.split("</p>", 1)[0]
    parsed = _Tables()
    parsed.feed(page)
    first = parsed.tables[0]
    assert first[0][0] == "format" and first[0][-1] == "run it"
    assert first[1][:2] == ["onnx", "int8"] and first[1][-1] == "edge3dfa run photo.jpg --artifact onnx/mb05_int8.onnx"
    assert first[2][0] == "tflite" and "none of its 1 artifact(s) passed (1 FAILED)" in first[2][-1]
    assert first[3][0] == "executorch" and "not attempted" in first[3][-1]
    assert page.index("<table") < page.index("<img")  # the table, then the plots
    assert 'alt="latency_nme"' in page and page.index('alt="latency_nme"') < page.index('alt="ced"')
    assert "<details><summary>CED of every target" in page  # the failed tflite row is not in the first CED
    assert 'alt="sensitivity"' in page and "<h2>Int8 within an NME budget</h2>" in page


def test_gates_are_a_table_and_the_verdict_is_the_first_column(written):
    _, out = written
    page = (out / "report.html").read_text()
    parsed = _Tables()
    parsed.feed(page)
    (gates,) = [t for t in parsed.tables if t[0][:3] == ["applies to", "gate", "limit"]]
    cells = {(r[0], r[1]): r[2] for r in gates[1:]}
    assert cells[("every target", "max_delta_nme")] == f"<= {LOSSY_DELTA_NME:g}"
    assert cells[("precision fp32", "max_abs_delta_nme")] == "<= 0.02"
    assert "{'max_delta_nme'" not in page and "{&#x27;max_delta_nme" not in page  # no Python dict
    (accuracy,) = [t for t in parsed.tables if "balanced" in t[0]]
    assert accuracy[0][0] == "verdict"
    assert [r[0].split(":")[0] for r in accuracy[1:]] == ["PASSED", "PASSED", "PASSED", "FAILED"]
    md = (out / "report.md").read_text()
    assert md.splitlines()[0].startswith("**Verdict: FAILED (")
    assert md.index("| format | precision |") < md.index("| applies to | gate |") < md.index("| verdict | target |")


def test_the_printed_summary_ends_with_what_to_ship_and_the_next_command(written, tmp_path):
    rep, _ = written
    buf = io.StringIO()
    report.print_summary(rep, buf, folder="out/mb05")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("Verdict: FAILED (")
    assert lines[-2:] == ["Next:", "  edge3dfa run photo.jpg --artifact out/mb05/onnx/mb05_int8.onnx"]
    assert any(line.startswith("tflite: none of its 1 artifact(s) passed") for line in lines)
    nothing = _build([_row("onnx", "int8", delta=FAILING)])
    buf = io.StringIO()
    report.print_summary(nothing, buf)
    assert buf.getvalue().splitlines()[-1].startswith("Next: nothing passed, so nothing to run")


# ---------------------------------------------------------------- the detector export writes beside the regressor


def _detector(fmt: str, iou: float | None = 0.999999, status: str = "ok") -> DetectorRow:
    """A FaceBoxes artifact as export records it; its parity as measure.parity.detector_parity writes it."""
    photo = {"faces": [2, 2], "box_min_iou": iou, "box_max_px": 1e-4, "landmark_mean_px": 1e-4,
             "landmark_max_px": 2e-4, "landmark_max_crop_px": 1e-4}
    return DetectorRow(key=f"faceboxes/{fmt}/fp32", model="faceboxes", format=fmt, precision="fp32", status=status,
                       reason=None if status == "ok" else "conversion failed: boom",
                       artifact=f"../faceboxes/{fmt}/faceboxes_fp32.{fmt}" if status == "ok" else None,
                       size_bytes=4_000_000, parity={"photo a": photo} if status == "ok" else None, seconds=9.0)


def test_the_run_command_names_the_passing_detector_of_its_format_and_a_failed_detector_fails_the_report(tmp_path):
    rows = [_row("onnx", "fp32"), _row("tflite", "fp32")]
    rep = _build(rows, detectors=[_detector("onnx"), _detector("tflite", iou=float("nan"))])
    assert rep["verdict"] == "FAILED" and not rep["passed"]  # every regressor passed; the TFLite detector did not
    assert any(r.startswith("detector faceboxes tflite fp32") and "min_box_iou not finite" in r
               for r in rep["verdict_reasons"])
    onnx, tflite = _pick(rep, "onnx"), _pick(rep, "tflite")
    assert onnx["command"] == ("edge3dfa run photo.jpg --artifact onnx/mb05_fp32.onnx "
                               "--detector ../faceboxes/onnx/faceboxes_fp32.onnx")
    assert tflite["detector"] is None and "--detector" not in tflite["command"]  # a FAILED detector is not shipped
    buf = io.StringIO()
    report.print_summary(rep, buf, folder="out/mb05")
    assert ("  edge3dfa run photo.jpg --artifact out/mb05/onnx/mb05_fp32.onnx "
            "--detector out/faceboxes/onnx/faceboxes_fp32.onnx") in buf.getvalue().splitlines()
    report.write(rep, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "## Detector" in md and "<h2>Detector</h2>" in page and "../faceboxes/onnx/faceboxes_fp32.onnx" in md


def test_a_detector_that_failed_to_convert_makes_the_report_failed_and_one_that_passed_keeps_it_passed():
    rows = [_row("onnx", "fp32")]
    assert _build(rows, detectors=[_detector("onnx")])["verdict"] == "PASSED"
    failed = _build(rows, detectors=[_detector("onnx", status="error")])
    assert failed["verdict"] == "FAILED" and "conversion failed: boom" in " ".join(failed["verdict_reasons"])
    assert _pick(failed, "onnx")["detector"] is None
    assert _build(rows, detectors=[_detector("onnx", iou=None)])["verdict"] == "NOT VERIFIED"
