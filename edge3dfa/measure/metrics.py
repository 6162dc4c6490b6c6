"""AFLW2000-3D metrics under the 3DDFA protocol (cleardusk/3DDFA benchmark_aflw2000.py).

NME of one face = mean 2-D point-to-point distance over the 68 landmarks / sqrt(w * h) of the ground
truth's 68-point bounding box, in percent. Faces are split by |yaw| into [0,30], (30,60] and (60,90]; the
third bin takes every |yaw| > 60, including the 7 faces whose fitted yaw exceeds 90 degrees, exactly as
upstream's ``ana`` does, which is what gives the 1312/383/305 split. Papers report the mean of the three
bin means ("balanced"); the plain mean over faces is reported beside it.
"""

from __future__ import annotations

import numpy as np

#: upper edges of the |yaw| bins in degrees; a value on an edge belongs to the lower bin
BIN_EDGES = (30.0, 60.0)
BIN_LABELS = ("[0,30]", "(30,60]", "(60,90]")
AUC_LIMIT = 7.0  # percent
FAILURE_THRESHOLD = 10.0  # percent
#: thresholds (percent) at which CED curves are sampled in reports
CED_THRESHOLDS = np.round(np.arange(0.0, 10.0001, 0.1), 4)


def nme(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-face NME in percent: pred, gt [N,>=2,68] (x, y rows first) in the same pixels -> [N] float64."""
    p = np.asarray(pred, np.float64)[:, :2]
    g = np.asarray(gt, np.float64)[:, :2]
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must both be [N,2,K]")
    wh = g.max(axis=2) - g.min(axis=2)
    size = np.sqrt(wh[:, 0] * wh[:, 1])
    return np.linalg.norm(p - g, axis=1).mean(axis=1) / size * 100.0


#: 3DDFA's AFLW benchmark (benchmark_aflw.py): each of AFLW's 21 points as the mean of these 68-point indices
AFLW21_FROM_68 = ((17,), (19,), (21,), (22,), (24,), (26,), (36,), tuple(range(36, 42)), (39,), (42,),
                  tuple(range(42, 48)), (45,), (2,), (31,), (30,), (35,), (14,), (48,), tuple(range(60, 68)), (54,),
                  (8,))


def nme_aflw21(pred68: np.ndarray, gt21: np.ndarray) -> np.ndarray:
    """Per-face NME (%) on AFLW's 21 points, as 3DDFA's benchmark_aflw.py: pred [N,>=2,68], gt [N,2,21].

    Points marked -1 in the ground truth (not visible) are left out. Upstream normalises by the box of the
    68-point fits, which are not published for AFLW; the box of the visible 21 points is used instead, so
    figures are comparable between models scored here, not with published AFLW tables.
    """
    p = np.asarray(pred68, np.float64)[:, :2]
    g = np.asarray(gt21, np.float64)[:, :2]
    if p.ndim != 3 or p.shape[2] != 68 or g.ndim != 3 or g.shape[2] != 21 or len(p) != len(g):
        raise ValueError(f"pred {p.shape} must be [N,2,68] and gt {g.shape} [N,2,21]")
    est = np.stack([p[:, :, list(ix)].mean(axis=2) for ix in AFLW21_FROM_68], axis=2)
    valid = (g[:, 0] != -1) & (g[:, 1] != -1)  # [N,21]
    out = np.empty(len(p))
    for i in range(len(p)):
        v = g[i][:, valid[i]]
        size = np.sqrt(np.ptp(v[0]) * np.ptp(v[1]))
        out[i] = np.linalg.norm(est[i][:, valid[i]] - v, axis=0).mean() / size * 100.0
    return out


def yaw_bins(yaw: np.ndarray) -> np.ndarray:
    """|yaw| in degrees -> bin index 0, 1, 2 (<= 30, (30, 60], > 60)."""
    return np.searchsorted(np.asarray(BIN_EDGES), np.abs(np.asarray(yaw, np.float64)), side="left")


def ced(errors: np.ndarray, thresholds: np.ndarray = CED_THRESHOLDS) -> np.ndarray:
    """Cumulative error distribution: fraction of faces with NME <= each threshold."""
    e = np.sort(np.asarray(errors, np.float64))
    return np.searchsorted(e, np.asarray(thresholds, np.float64), side="right") / max(len(e), 1)


def auc(errors: np.ndarray, limit: float = AUC_LIMIT) -> float:
    """Area under the CED curve from 0 to ``limit`` percent, divided by ``limit`` (1 = every face perfect).

    Exact, not sampled: the integral of P(e <= t) over [0, L] equals the mean of max(0, L - e).
    """
    e = np.asarray(errors, np.float64)
    return float(np.mean(np.clip(1.0 - e / limit, 0.0, 1.0))) if len(e) else float("nan")


def failure_rate(errors: np.ndarray, threshold: float = FAILURE_THRESHOLD) -> float:
    """Fraction of faces whose NME is above ``threshold`` percent."""
    e = np.asarray(errors, np.float64)
    return float(np.mean(e > threshold)) if len(e) else float("nan")


def balanced_mean(bin_means: list[float | None]) -> float | None:
    """Mean of the per-bin means, as papers report; None when a bin is empty."""
    if any(m is None or not np.isfinite(m) for m in bin_means):
        return None
    return float(np.mean(bin_means))


def summarize(errors: np.ndarray, yaw: np.ndarray) -> dict:
    """Per-bin means and counts, balanced and plain mean, median, AUC@7% and failure rate @10%."""
    e = np.asarray(errors, np.float64)
    bins = yaw_bins(yaw)
    per_bin = {}
    for k, label in enumerate(BIN_LABELS):
        sel = e[bins == k]
        per_bin[label] = {"mean": float(sel.mean()) if len(sel) else None, "count": int(len(sel))}
    return {
        "bins": per_bin,
        "balanced": balanced_mean([b["mean"] for b in per_bin.values()]),
        "mean": float(e.mean()),
        "median": float(np.median(e)),
        "auc7": auc(e),
        "failure10": failure_rate(e),
        "count": int(len(e)),
    }


def delta(a: dict, b: dict) -> dict:
    """``a`` minus ``b`` for two ``summarize`` results: balanced, mean and each bin's mean (None where missing)."""
    def sub(u: float | None, v: float | None) -> float | None:
        return None if u is None or v is None else float(u - v)

    return {"balanced": sub(a["balanced"], b["balanced"]), "mean": sub(a["mean"], b["mean"]),
            "bins": {k: sub(a["bins"][k]["mean"], b["bins"][k]["mean"]) for k in BIN_LABELS}}
