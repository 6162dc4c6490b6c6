"""measure.bootstrap against references that do not use it: exact bootstrap moments, coverage on synthetic data
with a known mean, pairing, seeding. Together about a second."""

from __future__ import annotations

import numpy as np
import pytest

from edge3dfa.measure import bootstrap, metrics

YAWS = np.array([10.0, 45.0, 75.0])  # one yaw in each |yaw| bin


def _yaw(counts: tuple[int, int, int]) -> np.ndarray:
    return np.repeat(YAWS, counts)


def test_resampled_bin_means_have_the_exact_bootstrap_moments():
    """A bootstrap mean of n values drawn with replacement has expectation mean(x) and variance var(x, ddof=0)/n
    (the plug-in variance): checked per bin and for the balanced mean (mean of 3 independent bin means), with a
    tolerance of 4 standard errors of the sample moments over R resamples."""
    rng = np.random.default_rng(1)
    counts = (7, 5, 3)
    x = rng.normal(size=sum(counts)) * np.repeat([1.0, 2.0, 3.0], counts)
    resamples = 40000
    means = bootstrap.bin_means(x, _yaw(counts), resamples, seed=5)
    parts = np.split(x, np.cumsum(counts)[:-1])
    for m, part in zip(means, parts):
        var = part.var() / len(part)
        assert abs(m.mean() - part.mean()) < 4 * np.sqrt(var / resamples)
        assert abs(m.var() / var - 1) < 4 * np.sqrt(2 / resamples)
    balanced = np.mean(means, axis=0)
    var_b = sum(p.var() / len(p) for p in parts) / 9
    assert abs(balanced.var() / var_b - 1) < 4 * np.sqrt(2 / resamples)


def test_two_faces_hand_computed():
    """One bin of two values 0 and 1: the resample mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 95%
    interval is [0, 1]; the other two bins likewise, so the balanced interval lies within [(0+3+5)/3, (1+4+6)/3]."""
    iv = bootstrap.interval(np.array([0.0, 1.0, 3.0, 4.0, 5.0, 6.0]), np.array([0.0, 5.0, 40.0, 50.0, 80.0, 85.0]),
                            resamples=2000)
    assert iv["bins"] == {"[0,30]": [0.0, 1.0], "(30,60]": [3.0, 4.0], "(60,90]": [5.0, 6.0]}
    assert 8 / 3 <= iv["balanced"][0] < iv["balanced"][1] <= 11 / 3  # within the extremes of the three bins


def test_a_bin_of_one_face_has_no_interval():
    """One face in a bin has no spread to resample: a zero-width interval there claimed certainty and narrowed the
    balanced one (export --samples 14, one face at (60,90]: int8 "-0.047 [-0.074, -0.020]", better than fp32
    at 95 %). No interval for that bin nor the balanced mean; the bins with faces to resample keep theirs."""
    iv = bootstrap.interval(np.array([0.0, 1.0, 3.0, 4.0, 5.0]), np.array([0.0, 5.0, 40.0, 50.0, 80.0]))
    assert iv["bins"]["(60,90]"] is None and iv["balanced"] is None
    assert iv["bins"]["[0,30]"] == [0.0, 1.0] and iv["bins"]["(30,60]"] == [3.0, 4.0] and iv["mean"] is not None


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Synthetic per-face Δ with a known balanced mean, 400 independent data sets: coverage within 3 binomial
    standard deviations of 0.95 (the percentile bootstrap's small-sample shortfall at n=60 per bin is about 0.5
    points, well inside)."""
    rng = np.random.default_rng(2024)
    counts, means, sds = (120, 60, 60), (0.01, 0.03, 0.08), (0.1, 0.2, 0.3)
    truth = float(np.mean(means))
    yaw, trials, hits = _yaw(counts), 400, 0
    for t in range(trials):
        x = np.concatenate([rng.normal(m, s, n) for m, s, n in zip(means, sds, counts)])
        lo, hi = bootstrap.interval(x, yaw, resamples=500, seed=t)["balanced"]
        hits += lo <= truth <= hi
    sd = np.sqrt(0.95 * 0.05 / trials)
    assert abs(hits / trials - 0.95) < 3 * sd


def test_paired_delta_resamples_faces_not_models():
    """Two models whose per-face NMEs vary hugely from face to face but differ by a small constant: the paired
    interval is about as narrow as the differences' own scatter allows, far narrower than the faces' spread."""
    rng = np.random.default_rng(3)
    counts = (100, 60, 40)
    base = rng.gamma(2.0, 2.0, sum(counts))
    noise = rng.normal(0, 0.01, len(base))
    d = bootstrap.paired_delta(base + 0.05 + noise, base, _yaw(counts))
    lo, hi = d["ci"]["balanced"]
    assert d["balanced"] == pytest.approx(0.05, abs=0.005)
    se = np.sqrt(sum(0.01 ** 2 / n for n in counts)) / 3
    assert lo < d["balanced"] < hi and (hi - lo) < 2 * 1.96 * se * 1.3
    unpaired_se = np.sqrt(sum(base[:n].var() / n for n in counts)) / 3
    assert hi - lo < 0.05 * unpaired_se


def test_seeded_and_rules():
    x, yaw = np.linspace(-1, 1, 90), _yaw((30, 30, 30))
    assert bootstrap.interval(x, yaw) == bootstrap.interval(x, yaw)
    assert bootstrap.interval(x, yaw, seed=1)["balanced"] != bootstrap.interval(x, yaw, seed=2)["balanced"]
    d = bootstrap.paired_delta(x + 0.1, x * 0 + 0.1, yaw)
    assert bootstrap.upper(d) == d["ci"]["balanced"][1] and bootstrap.upper(d, label="(60,90]") > 0
    small = bootstrap.smallest_budget(d)
    assert small["balanced"] == pytest.approx(d["ci"]["balanced"][1] - d["balanced"])
    assert small["bin"] >= small["balanced"]
    empty = bootstrap.interval(x[:60], yaw[:60])
    assert empty["balanced"] is None and empty["bins"]["(60,90]"] is None and empty["mean"] is not None
    assert bootstrap.text(d).startswith(f"{d['balanced']:+.3f} [")
    assert metrics.BIN_LABELS == tuple(d["ci"]["bins"])
