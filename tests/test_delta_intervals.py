"""Every ΔNME the validation report gives carries its paired bootstrap interval (issue 18): the harness attaches it,
report.json keeps it, report.md shows it beside the Δ, and the gates still compare the point estimate.

Cheap: hand-built rows and per-face arrays, no conversion; the interval is checked against ``bootstrap.interval``
on the per-face differences computed here, and its pairing against the spread an unpaired comparison would have.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_report import YAW, _build, _row

from edge3dfa.measure import bootstrap, metrics
from edge3dfa.validation.harness import _compare_with_fp32
from edge3dfa.validation.rows import Row


def _scored(fmt: str, precision: str, faces: np.ndarray, params: np.ndarray) -> tuple[Row, np.ndarray]:
    r = _row(fmt, precision)
    r.update(nme=metrics.summarize(faces, YAW), per_face=faces)
    return Row(**r), params


def test_delta_vs_fp32_carries_the_paired_interval_of_the_same_faces():
    rng = np.random.default_rng(7)
    fp32 = rng.gamma(3.0, 1.3, len(YAW))  # faces differ a lot from each other...
    int8 = fp32 + 0.05 + rng.normal(0, 0.02, len(YAW))  # ...int8 differs little from fp32 on each
    params = rng.normal(size=(len(YAW), 62)).astype(np.float32)
    rows = _compare_with_fp32([_scored("onnx", "fp32", fp32, params), _scored("onnx", "int8", int8, params)], YAW)
    d = rows[1][0].delta_vs_fp32
    assert rows[0][0].delta_vs_fp32 is None  # fp32 is the base, never compared with itself
    assert d["balanced"] == pytest.approx(metrics.summarize(int8, YAW)["balanced"] - metrics.summarize(fp32, YAW)[
        "balanced"])
    assert d["ci"]["balanced"] == bootstrap.interval(int8 - fp32, YAW)["balanced"]
    lo, hi = d["ci"]["balanced"]
    assert lo < d["balanced"] < hi and hi - lo < 0.1 * np.ptp(fp32)  # paired: the faces' spread cancels


def test_report_shows_every_delta_with_its_interval_and_gates_the_point():
    rng = np.random.default_rng(8)
    faces = 3.8 + rng.normal(0, 0.05, len(YAW))
    noise = rng.normal(0, 0.05, len(YAW))
    bins = metrics.yaw_bins(YAW)
    noise -= np.array([noise[bins == k].mean() for k in range(3)])[bins]  # zero in every bin: the Δ is 0.09
    row = _row("onnx", "int8", delta=0.09)
    row["delta_vs_reference"] = bootstrap.paired_delta(faces + 0.09 + noise, faces, YAW)
    _, hi = row["delta_vs_reference"]["ci"]["balanced"]
    assert hi > 0.10  # the upper end is above the default gate, the point (0.09) below it
    rep = _build([row])
    target = rep["targets"][1]
    gate = next(g for g in target["gates"] if g["gate"] == "max_delta_nme")
    assert gate["value"] == pytest.approx(0.09, abs=1e-6) and gate["passed"]  # gates: point estimate
    assert target["delta_vs_reference"]["ci"]["level"] == 0.95
    from edge3dfa.validation.report import render_markdown

    md = render_markdown(rep, {})
    assert bootstrap.text(target["delta_vs_reference"]) in md and "[+0." in md
    assert "point estimate" in md  # the gates note says what the gates compare


def test_departure_is_the_nme_against_the_reference_landmarks():
    """parity.departure, by hand: mean 2-D distance of the 68 landmarks over sqrt(w*h) of the reference's box, %."""
    from edge3dfa.measure.parity import crop_landmarks, departure

    rng = np.random.default_rng(9)
    ref = rng.normal(0, 0.3, (5, 62)).astype(np.float32)
    cand = ref + rng.normal(0, 0.02, ref.shape).astype(np.float32)
    a, b = crop_landmarks(ref), crop_landmarks(cand)  # [5,2,68] crop px
    size = np.sqrt(np.ptp(a[:, 0], axis=1) * np.ptp(a[:, 1], axis=1))
    expected = np.sqrt(((a - b) ** 2).sum(axis=1)).mean(axis=1) / size * 100
    assert departure(ref, cand) == pytest.approx(expected, rel=1e-6)
    assert np.all(departure(ref, ref) == 0) and np.all(expected > 0)
