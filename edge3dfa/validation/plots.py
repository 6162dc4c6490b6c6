"""The report's plots (matplotlib, Agg canvas, no display needed), as PNG bytes by name.

One colour per format and one marker per precision in every plot, so a point, a curve and a table row of the
same artifact look alike; artifacts that did not pass are drawn hollow. Plots, in the report's order:

- ``latency_nme``: latency at batch 1, one thread vs balanced NME, with the Pareto front of the passing
  artifacts (no other passing artifact is both faster and more accurate) and the recommended ones ringed;
- ``ced``: the cumulative error distribution of the PyTorch reference and the recommended artifacts;
  ``ced_all``: every scored target (drawn only when it shows more than ``ced``);
- ``bins``: NME per yaw bin and balanced; ``size_nme``: size on disk vs balanced NME;
- ``sensitivity``: per-layer NME gain of ``--nme-budget`` searches.

A broken artifact (NME in the hundreds) must not squash the others: NME axes stop at 3x the reference's
balanced NME (3x the best target's without one) and points beyond are drawn at the edge, said in the title.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from edge3dfa.measure import metrics
from edge3dfa.validation.recommend import BATCH, THREADS, latency_ms

#: fixed colours for the known formats; others take the next unused tab10 colours in report order
FORMAT_COLOURS = {"torch": "#444444", "onnx": "#1f77b4", "tflite": "#ff7f0e", "coreml": "#2ca02c",
                  "executorch": "#d62728"}
SPARE_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")
#: fixed markers for the known precisions; others take the spare markers in report order
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "dyn-int8": "v", "w8": "D", "w8a8": "P", "pal6": "X",
                     "pal4": "h"}
SPARE_MARKERS = ("<", ">", "p", "d", "H", "8", "*")


def label(row: dict[str, Any]) -> str:
    if row["role"] == "reference":
        return f"{row['model']} torch (reference)"
    return f"{row['model']} {row['format']} {row['precision']}{' bundle' if row.get('bundle') else ''}"


class Style:
    """Colour by format, marker by precision, for the rows of one report."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        spare_c, spare_m = iter(SPARE_COLOURS * 4), iter(SPARE_MARKERS * 4)
        self.colours = {f: FORMAT_COLOURS.get(f) or next(spare_c) for f in dict.fromkeys(r["format"] for r in rows)}
        self.markers = {p: PRECISION_MARKERS.get(p) or next(spare_m)
                        for p in dict.fromkeys(r["precision"] for r in rows)}

    def of(self, row: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for a marker of ``row``: hollow when it did not pass."""
        c = self.colours[row["format"]]
        solid = row["verdict"] == "PASSED"
        return {"color": c, "marker": self.markers[row["precision"]], "markerfacecolor": c if solid else "none",
                "markeredgecolor": c}

    def legend(self, ax: Any, rows: list[dict[str, Any]], extra: tuple = (), **kw: Any) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=self.colours[f], lw=5, label=f) for f in dict.fromkeys(r["format"]
                                                                                          for r in rows)]
        handles += [Line2D([], [], color="0.35", marker=self.markers[p], ls="", label=p)
                    for p in dict.fromkeys(r["precision"] for r in rows)]
        if any(r["verdict"] != "PASSED" for r in rows):
            handles.append(Line2D([], [], color="0.35", marker="o", markerfacecolor="none", ls="",
                                  label="hollow: not passed"))
        ax.legend(handles=[*handles, *extra], fontsize=7, **kw)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _nme_top(rows: list[dict[str, Any]]) -> float | None:
    refs = [r["nme"]["balanced"] for r in rows if r["role"] == "reference" and r["nme"]["balanced"]]
    scored = [r["nme"]["balanced"] for r in rows if r["nme"]["balanced"]]
    return 3 * max(refs) if refs else (3 * min(scored) if scored else None)


def _clip(value: float, top: float | None) -> float:
    return value if top is None else min(value, top)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, nme) no other point beats on both (ties on both: the first), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] < points[front[-1]][1]:
            front.append(i)
    return front


def latency_nme(rows: list[dict[str, Any]], style: Style, recommended: set[str]) -> bytes | None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    timed = [r for r in rows if latency_ms(r) is not None and r["nme"]["balanced"] is not None]
    if not timed:
        return None
    top = _nme_top(rows)
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.add_subplot()
    xy = [(latency_ms(r), _clip(r["nme"]["balanced"], top)) for r in timed]
    for r, (x, y) in zip(timed, xy):
        ax.plot(x, y, ls="", ms=11 if r["role"] == "reference" else 8, alpha=0.9, **style.of(r))
        if r["key"] in recommended:
            ax.plot(x, y, "o", ms=17, markerfacecolor="none", markeredgecolor="k", lw=1.2)
    ok = [i for i, r in enumerate(timed) if r["role"] == "artifact" and r["verdict"] == "PASSED"]
    front = [ok[i] for i in pareto([xy[i] for i in ok])]
    if front:
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="0.5", ls="--", lw=1,
                drawstyle="steps-post")
    xs = [x for x, _ in xy]
    if max(xs) > 30 * min(xs):  # PyTorch eager would flatten every converted artifact
        ax.set_xscale("log")
    clipped = top is not None and any(r["nme"]["balanced"] > top for r in timed)
    ax.set(xlabel=f"median ms per image (batch {BATCH}, {THREADS} thread)", ylabel="balanced NME (%)",
           title="Latency vs accuracy" + (f" (NME above {top:.1f} drawn at the edge)" if clipped else ""))
    ax.grid(alpha=0.3)
    extra = (Line2D([], [], color="0.5", ls="--", label="Pareto front (passed)"),
             Line2D([], [], marker="o", ms=11, markerfacecolor="none", markeredgecolor="k", ls="",
                    label="recommended"))
    style.legend(ax, timed, extra, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def ced(rows: list[dict[str, Any]], style: Style, thresholds: list[float], title: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.add_subplot()
    every = max(1, len(thresholds) // 8)
    for i, r in enumerate(rows):
        ref = r["role"] == "reference"
        ax.plot(thresholds, np.asarray(r["ced"]) * 100, lw=2.2 if ref else 1.3, ls="--" if ref else "-",
                markevery=(i % every, every), ms=6, label=f"{label(r)} (AUC7 {_auc(r)})", **style.of(r))
    ax.set(xlabel="NME (%)", ylabel="faces (%)", xlim=(0, thresholds[-1]), ylim=(0, 100), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _auc(row: dict[str, Any]) -> str:
    auc = row["nme"].get("auc7")
    return "-" if auc is None else f"{auc:.3f}"


def bins(rows: list[dict[str, Any]], style: Style) -> bytes:
    from matplotlib.figure import Figure

    top = _nme_top(rows)
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.add_subplot()
    groups = [*metrics.BIN_LABELS, "balanced"]
    width = 0.8 / len(rows)
    clipped = False
    for i, r in enumerate(rows):
        vals = [r["nme"]["bins"][b]["mean"] for b in metrics.BIN_LABELS] + [r["nme"]["balanced"]]
        x = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        y = [np.nan if v is None else _clip(v, top) for v in vals]
        clipped |= top is not None and any(v is not None and v > top for v in vals)
        ax.plot(x, y, ls="", ms=7, **style.of(r))
    ax.set_xticks(np.arange(len(groups)), [f"|yaw| {b}" if b != "balanced" else b for b in groups])
    ax.set(ylabel="NME (%)", title="NME per yaw bin" + (f" (above {top:.1f} drawn at the edge)" if clipped else ""))
    ax.grid(axis="y", alpha=0.3)
    style.legend(ax, rows, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def size_nme(rows: list[dict[str, Any]], style: Style) -> bytes | None:
    from matplotlib.figure import Figure

    sized = [r for r in rows if r["nme"]["balanced"] is not None and r.get("size_bytes")]
    if not sized:
        return None
    top = _nme_top(rows)
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.add_subplot()
    for r in sized:
        ax.plot(r["size_bytes"] / 1e6, _clip(r["nme"]["balanced"], top), ls="", alpha=0.9,
                ms=11 if r["role"] == "reference" else 8, **style.of(r))
    ax.set(xlabel="size on disk (MB)", ylabel="balanced NME (%)", title="Size vs accuracy")
    ax.grid(alpha=0.3)
    style.legend(ax, sized, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def sensitivity(searched: list[dict[str, Any]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 1.2 + 2.2 * len(searched)))
    for i, r in enumerate(searched):
        sens = r["quantization"]["sensitivity"]
        order = [x["layer"] for x in sorted(sens, key=lambda x: x.get("index", 0))]
        by = {x["layer"]: x for x in sens}
        ax = fig.add_subplot(len(searched), 1, i + 1)
        gains = [by[k]["gain"] if k in by else 0.0 for k in order]
        keep = set(r["quantization"]["float_layers"])
        ax.bar(range(len(order)), gains, color=["tab:red" if k in keep else "tab:blue" for k in order])
        ax.set(ylabel="NME gain", title=f"{label(r)}: NME gain when each layer alone stays float (red: kept float)")
        ax.axhline(0, color="k", lw=0.5)
        sq = [by[k]["sqnr_db"] if k in by and by[k]["sqnr_db"] is not None else np.nan for k in order]
        if np.isfinite(sq).any():
            ax2 = ax.twinx()
            ax2.plot(range(len(order)), sq, "k.", ms=3)
            ax2.set_ylabel("SQNR dB (dots)", fontsize=7)
        ax.set_xlabel("layer (graph order)", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def figures(report: dict, recommended: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of each plot, in the report's order; empty when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    rows = [r for r in report["targets"] if r["status"] == "ok" and r["nme"]]
    if not rows:
        return {}
    style = Style(rows)
    chosen = {e["key"] for e in recommended if e.get("key")}
    shown = [r for r in rows if r["role"] == "reference" or r["key"] in chosen]
    d = report["dataset"]
    out: dict[str, bytes | None] = {"latency_nme": latency_nme(rows, style, chosen)}
    if shown:
        out["ced"] = ced(shown, style, report["ced_thresholds"],
                         f"CED: reference and recommended ({d['count']} faces)")
    if len(shown) < len(rows):
        out["ced_all"] = ced(rows, style, report["ced_thresholds"], f"CED: every target ({d['count']} faces)")
    out["bins"] = bins(rows, style)
    out["size_nme"] = size_nme(rows, style)
    searched = [r for r in report["targets"] if (r.get("quantization") or {}).get("sensitivity")]
    if searched:
        out["sensitivity"] = sensitivity(searched)
    return {k: v for k, v in out.items() if v is not None}
