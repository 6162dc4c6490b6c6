"""Validation report: ``report.json`` (machine-readable), ``report.md`` and a self-contained ``report.html``.

report.json, schema ``edge3dfa.report/2`` (numbers are plain JSON numbers; null where not measured)::

    schema            "edge3dfa.report/2"
    verdict           "PASSED" | "FAILED" | "NOT VERIFIED" (edge3dfa.validation.gates.verdict): FAILED when a
                      target failed a gate or could not be opened, run or scored; NOT VERIFIED when nothing failed
                      but something was not checked (a target skipped by the user's choice, a gate that could not
                      be computed, no gates at all, no artifact scored); PASSED otherwise. ``validate``/``export``
                      exit 0 only for PASSED, 1 for FAILED and NOT VERIFIED.
    verdict_reasons   [one line per target that is not PASSED: what failed or was not checked]
    passed            verdict == "PASSED"
    created           ISO time (UTC); edge3dfa_version; tools {package: version}
    machine           {platform, machine, python, cpu_threads}
    dataset           {name, mode (crops|pipeline), ground_truth (original|reannotated), count, subset,
                       missed [photo names, pipeline mode], source, bins [labels], bin_counts {label: n},
                       files [image names in evaluation order]}
    protocol          {nme, bins, balanced, auc, failure}: one-line definitions of the metrics
    ced_thresholds    [percent]: x values of every target's ``ced``
    models            {source sha256: {name, arch, checkpoint, sha256, params, macs}}
    reference         "pytorch" (relative gates vs the PyTorch checkpoint) or "none" (vs the format's fp32)
    gates             the limits applied (see edge3dfa.validation.gates)
    not_attempted     [{what, reason}]: formats/precisions export did not convert (extra not installed, not
                      offered by the format); outside the plan, so they do not change the verdict
    targets           one object per target, the PyTorch reference of each model first:
      key, role (reference|artifact), status, reason: ok; error (could not be converted, opened, run or scored:
                      reason says why, crash_log names the traceback of an unexpected exception); skipped (by the
                      user's choice, e.g. --skip-unavailable); not_applicable (not a landmark regressor, e.g. a
                      detector: not judged)
      verdict         PASSED | FAILED | NOT VERIFIED (null when not_applicable); passed (verdict == PASSED)
      model, format, precision, runtime, artifact, manifest (paths relative to the report), size_bytes,
      source_sha256
      manifest_verified  false when the artifact was used with --no-verify (then at best NOT VERIFIED)
      nme             {bins {label: {mean, count}}, balanced, mean, median, auc7, failure10, count}  (percent;
                      auc7 and failure10 are fractions)
      ced             [fraction of faces with NME <= each of ced_thresholds]
      per_face        [NME percent per face, same order as dataset.files]
      delta_vs_reference  {balanced, mean, bins {label}}: NME points minus the reference's, same faces
                      (null when validated with --reference none)
      delta_vs_fp32       the same against this format's fp32 artifact (null if none)
      parity          {param_max_abs, param_mean_abs, landmark_max_px, landmark_mean_px, n}: vs the reference's
                      params on the same crops (landmarks in 120x120 crop pixels); null without reference
      parity_vs_fp32  the same against this format's fp32 artifact (null if none)
      latency         [{threads, batch, median_ms, p90_ms, min_ms, per_image_ms, runs}]; latency_note says why
                      it is empty when the runtime is only a simulation (e.g. CoreML evaluated in numpy)
      gates           [{gate, value, limit, passed (true|false|null: not checked), vs (reference|fp32|null),
                       note}]

Plots (matplotlib, Agg canvas, no display needed): CED curves of all targets, NME per yaw bin, latency,
size vs NME. They are embedded in the HTML as base64 PNG and written beside report.md for it to link.
"""

from __future__ import annotations

import base64
import html
import io
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa import __version__
from edge3dfa.datasets import EvalSet
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import json_text, write_files
from edge3dfa.manifest import tool_versions
from edge3dfa.measure import metrics
from edge3dfa.measure.timing import cpu_threads
from edge3dfa.validation.gates import PASSED, Gates, check, row_verdict, verdict

SCHEMA = "edge3dfa.report/2"
PROTOCOL = {
    "nme": "mean 2-D distance over 68 landmarks / sqrt(w*h) of the ground truth's 68-point box, percent",
    "bins": "|yaw| from AFLW2000-3D.pose.npy: <=30, (30,60], >60 (3DDFA benchmark_aflw2000.py; >90 goes to the last)",
    "balanced": "mean of the three bin means (as papers report); 'mean' is the plain mean over faces",
    "auc": "area under the CED curve from 0 to 7% NME, divided by 7 (1 = perfect)",
    "failure": "fraction of faces with NME > 10%",
}
PLOTS = ("ced", "bins", "latency", "size_nme", "sensitivity")
BUDGET_TEXT = ("Made by convert --nme-budget: choices were judged on held-out AFLW calibration crops (21 points, "
               "never calibrated on), never on AFLW2000-3D; the AFLW2000-3D column is the evaluation figure of this "
               "report. Search latency: batch 1, one thread, on the converting machine.")


def _label(row: dict[str, Any]) -> str:
    if row["role"] == "reference":
        return f"{row['model']} torch (reference)"
    return f"{row['model']} {row['format']} {row['precision']}"


def _round(x: Any, nd: int = 6) -> Any:
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else round(float(x), nd)
    if isinstance(x, np.integer):
        return int(x)
    return x


def runtime_packages() -> tuple[str, ...]:
    """What the formats' extras install (edge3dfa.target.extras; not dev, validate, all): the report records the
    versions of those installed, whatever formats are registered."""
    from edge3dfa.target import extras

    skip = {"dev", "validate", "all"}
    return tuple(dict.fromkeys(p for name, pkgs in extras().items() if name not in skip for p in pkgs))


def build(result: dict[str, Any], data: EvalSet, gates: Gates, not_attempted: list[dict[str, str]] | None = None,
          reference: str = "pytorch", tool_packages: tuple[str, ...] | None = None) -> dict:
    """The report.json object: evaluation rows + dataset, gates and machine, gates checked per target, verdict.
    ``tool_packages``: whose versions go in ``tools`` (default ``runtime_packages()``)."""
    targets = []
    for row in result["targets"]:
        row = dict(row)
        per_face = row.pop("per_face", None)
        row["ced"] = metrics.ced(per_face).tolist() if per_face is not None else None
        row["per_face"] = np.round(per_face, 4).tolist() if per_face is not None else None
        row["gates"] = check(row, gates.limits_for(row["format"], row["precision"])) if row["status"] == "ok" else []
        row["verdict"] = row_verdict(row)
        row["passed"] = row["verdict"] == PASSED
        targets.append(row)
    bins = metrics.yaw_bins(data.yaw)
    overall = verdict(targets)
    return _round({
        "schema": SCHEMA,
        "verdict": overall,
        "verdict_reasons": _reasons(targets),
        "passed": overall == PASSED,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edge3dfa_version": __version__,
        "tools": tool_versions(*(runtime_packages() if tool_packages is None else tool_packages)),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "python": platform.python_version(), "cpu_threads": cpu_threads()},
        "dataset": {**data.describe(), "bins": list(metrics.BIN_LABELS),
                    "bin_counts": {lab: int((bins == k).sum()) for k, lab in enumerate(metrics.BIN_LABELS)},
                    "files": list(data.files)},
        "protocol": PROTOCOL,
        "ced_thresholds": metrics.CED_THRESHOLDS.tolist(),
        "models": result["models"],
        "reference": reference,
        "gates": gates.to_dict(),
        "not_attempted": list(not_attempted or []),
        "targets": targets,
    })


def _gate_text(g: dict[str, Any]) -> str:
    vs = f" vs {g['vs']}" if g.get("vs") else ""
    if g["passed"] is None:
        return f"{g['gate']} not checked ({g.get('note', 'not measured')})"
    value = "not finite" if g["value"] is None else format(g["value"], ".4g")
    return f"{g['gate']} {value} > {g['limit']:g}{vs}"


def _reasons(targets: list[dict[str, Any]]) -> list[str]:
    """One line per target that is not PASSED, saying what failed or was not checked."""
    out = []
    for r in targets:
        if r["verdict"] is None or r["verdict"] == PASSED:
            continue
        who = _label(r) + (f" ({Path(r['artifact']).name})" if r.get("artifact") else "")
        if r["status"] != "ok":
            out.append(f"{who}: {r['status']}: {r['reason']}")
        elif r.get("manifest_verified") is False and not any(g["passed"] is False for g in r["gates"]):
            out.append(f"{who}: not checked against its manifest (--no-verify)")
        elif not r["gates"]:
            out.append(f"{who}: no gates were applied (--no-gates)")
        else:
            bad = [g for g in r["gates"] if g["passed"] is False] or [g for g in r["gates"] if g["passed"] is None]
            out.append(f"{who}: " + "; ".join(_gate_text(g) for g in bad))
    if not any(r["role"] == "artifact" and r["verdict"] for r in targets):
        out.append("no landmark-regressor artifact was scored")
    return out


def verdict_line(report: dict) -> str:
    """The report's first line: the verdict and what it rests on."""
    judged = [t for t in report["targets"] if t["verdict"]]
    counts = {v: sum(t["verdict"] == v for t in judged) for v in ("PASSED", "FAILED", "NOT VERIFIED")}
    tail = ", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n)
    ignored = sum(t["verdict"] is None for t in report["targets"])
    extra = f"; {ignored} not judged (not landmark regressors)" if ignored else ""
    return f"Verdict: {report['verdict']} ({len(judged)} targets: {tail or 'none'}{extra})"


# ---------------------------------------------------------------- plots

def _figures(report: dict) -> dict[str, bytes]:
    """PNG bytes of each plot; empty when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    rows = [r for r in report["targets"] if r["status"] == "ok" and r["nme"]]
    if not rows:
        return {}
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(rows) <= 10 else "tab20"].colors
    color = {r["key"]: palette[i % len(palette)] for i, r in enumerate(rows)}  # one colour per target, all plots
    out = {}

    def png(fig: Figure) -> bytes:
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for r in rows:
        ref = r["role"] == "reference"
        label = f"{_label(r)} (AUC7 {_f(r['nme']['auc7'], '.3f')})"
        ax.plot(report["ced_thresholds"], np.asarray(r["ced"]) * 100, label=label, color=color[r["key"]],
                lw=2.2 if ref else 1.3, ls="--" if ref else "-")
    ax.set(xlabel="NME (%)", ylabel="faces (%)", xlim=(0, report["ced_thresholds"][-1]), ylim=(0, 100),
           title=f"CED, {report['dataset']['name']} ({report['dataset']['count']} faces)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    out["ced"] = png(fig)

    # a broken artifact (NME in the hundreds) must not squash every other bar: cap the axis at 3x the reference
    # (without one, 3x the best target)
    refs = [r["nme"]["balanced"] for r in rows if r["role"] == "reference" and r["nme"]["balanced"]]
    scored = [r["nme"]["balanced"] for r in rows if r["nme"]["balanced"]]
    top = 3 * max(refs) if refs else (3 * min(scored) if scored else None)

    def tag(r: dict) -> str:
        big = top is not None and max(v["mean"] or 0 for v in r["nme"]["bins"].values()) > top
        return _label(r) + (" (off scale)" if big else "")

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    labels = [*metrics.BIN_LABELS, "balanced"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        vals = [r["nme"]["bins"][b]["mean"] or 0 for b in metrics.BIN_LABELS] + [r["nme"]["balanced"] or 0]
        ax.bar(np.arange(len(labels)) + (i - (len(rows) - 1) / 2) * width, vals, width, label=tag(r),
               color=color[r["key"]])
    ax.set_xticks(np.arange(len(labels)), [f"|yaw| {b}" if b != "balanced" else b for b in labels])
    ax.set(ylabel="NME (%)", title="NME per yaw bin")
    if top is not None:
        ax.set_ylim(0, min(ax.get_ylim()[1], top))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    out["bins"] = png(fig)

    timed = [r for r in rows if r["latency"]]
    settings = sorted({(lat["batch"], lat["threads"]) for r in timed for lat in r["latency"]})
    if settings:
        fig = Figure(figsize=(6.4, 0.8 + 0.3 * len(timed) * max(1, len(settings) / 2)))
        ax = fig.add_subplot()
        height = 0.8 / len(settings)
        every = []
        for j, (b, t) in enumerate(settings):
            vals = [next((lat["per_image_ms"] for lat in r["latency"] if (lat["batch"], lat["threads"]) == (b, t)),
                         np.nan) for r in timed]
            every += [v for v in vals if np.isfinite(v)]
            ax.barh(np.arange(len(timed)) + (j - (len(settings) - 1) / 2) * height, vals, height,
                    label=f"batch {b}, {t} thread{'s' if t > 1 else ''}")
        ax.set_yticks(np.arange(len(timed)), [_label(r) for r in timed], fontsize=7)
        ax.invert_yaxis()
        if every and max(every) > 30 * min(every):  # a slow runtime would flatten the others
            ax.set_xscale("log")
        ax.set(xlabel="median ms per image", title="Latency of predict")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7)
        out["latency"] = png(fig)

    balanced = [r for r in rows if r["nme"]["balanced"] is not None]  # None: a yaw bin without faces
    if balanced:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        for r in balanced:
            y = r["nme"]["balanced"] if top is None else min(r["nme"]["balanced"], top)
            ax.scatter(r["size_bytes"] / 1e6, y, marker="*" if r["role"] == "reference" else "o",
                       color=color[r["key"]], s=90 if r["role"] == "reference" else 40, label=tag(r), alpha=0.85)
        ax.set(xlabel="size on disk (MB)", ylabel="balanced NME (%)", title="Size vs accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        out["size_nme"] = png(fig)

    searched = [r for r in report["targets"] if (r.get("quantization") or {}).get("sensitivity")]
    if searched:
        fig = Figure(figsize=(6.4, 1.2 + 2.2 * len(searched)))
        for i, r in enumerate(searched):
            sens = r["quantization"]["sensitivity"]
            order = [x["layer"] for x in sorted(sens, key=lambda x: x.get("index", 0))]
            by = {x["layer"]: x for x in sens}
            ax = fig.add_subplot(len(searched), 1, i + 1)
            gains = [by[k]["gain"] if k in by else 0.0 for k in order]
            keep = set(r["quantization"]["float_layers"])
            ax.bar(range(len(order)), gains, color=["tab:red" if k in keep else "tab:blue" for k in order])
            ax.set(ylabel="NME gain", title=f"{_label(r)}: NME gain when each layer alone stays float "
                                            f"(red: kept float)")
            ax.axhline(0, color="k", lw=0.5)
            sq = [by[k]["sqnr_db"] if k in by and by[k]["sqnr_db"] is not None else np.nan for k in order]
            if np.isfinite(sq).any():
                ax2 = ax.twinx()
                ax2.plot(range(len(order)), sq, "k.", ms=3)
                ax2.set_ylabel("SQNR dB (dots)", fontsize=7)
            ax.set_xlabel("layer (graph order)", fontsize=7)
        fig.tight_layout()
        out["sensitivity"] = png(fig)
    return out


# ---------------------------------------------------------------- tables

def _f(x: Any, fmt: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _accuracy_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["target", "runtime", "size MB", *[f"NME {b}" for b in metrics.BIN_LABELS], "balanced", "mean",
            "AUC7", "fail>10%", "ΔNME vs torch", "ΔNME vs fp32", "param max err", "lm max px", "verdict"]
    body = []
    for r in report["targets"]:
        if r["status"] != "ok":
            what = {"error": "FAILED", "skipped": "NOT VERIFIED"}.get(r["status"], "not judged")
            body.append([_label(r), r["runtime"], _f(r["size_bytes"] / 1e6)] + ["-"] * (len(head) - 4)
                        + [f"{what}: {r['status']}: {r['reason']}"])
            continue
        n, d, d32 = r["nme"], r["delta_vs_reference"], r["delta_vs_fp32"]
        p = r["parity"] or r.get("parity_vs_fp32") or {}
        failed = [g["gate"] for g in r["gates"] if g["passed"] is False]
        unchecked = [g["gate"] for g in r["gates"] if g["passed"] is None]
        gate = ("FAILED " + ", ".join(failed) if failed else "NOT VERIFIED: " + ", ".join(unchecked) + " not checked"
                if unchecked else "pass" if r["gates"] else "NOT VERIFIED: no gates")
        fail = n["failure10"]
        body.append([_label(r), r["runtime"], _f(r["size_bytes"] / 1e6),
                     *[_f(n["bins"][b]["mean"]) for b in metrics.BIN_LABELS], _f(n["balanced"]), _f(n["mean"]),
                     _f(n["auc7"], ".3f"), _f(fail if fail is None else fail * 100, ".1f") + "%",
                     _f(d and d["balanced"], "+.3f"), _f(d32 and d32["balanced"], "+.3f"),
                     _f(p.get("param_max_abs"), ".2e"), _f(p.get("landmark_max_px"), ".3f"), gate])
    return head, body


def _latency_table(report: dict) -> tuple[list[str], list[list[str]]]:
    rows = [r for r in report["targets"] if r["status"] == "ok" and (r["latency"] or r.get("latency_note"))]
    settings = sorted({(lat["batch"], lat["threads"]) for r in rows for lat in r["latency"]})
    if not settings:
        return [], []
    head = ["target", *[f"b{b} {t}t median (p90) ms" for b, t in settings], "per image ms (best)"]
    body = []
    for r in rows:
        if not r["latency"]:
            body.append([_label(r), *["-"] * len(settings), r["latency_note"]])
            continue
        cells = []
        for s in settings:
            lat = next((x for x in r["latency"] if (x["batch"], x["threads"]) == s), None)
            cells.append(f"{lat['median_ms']:.2f} ({lat['p90_ms']:.2f})" if lat else "-")
        body.append([_label(r), *cells, _f(min(x["per_image_ms"] for x in r["latency"]), ".3f")])
    return head, body


def _budget_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """One row per artifact made by --nme-budget: what was asked, what the search chose, what it cost."""
    rows = [r for r in report["targets"] if r["status"] == "ok" and r.get("quantization")]
    head = ["target", "budget (bal / bin)", "met", "chosen", "layers kept float", "held-out ΔNME bal",
            *[f"held-out Δ {b}" for b in metrics.BIN_LABELS], "AFLW2000 ΔNME vs fp32", "size MB",
            "search ms b1 1t p10 (fp32)", "search s"]
    body = []
    for r in rows:
        q, d32 = r["quantization"], r["delta_vs_fp32"]
        layers = q["float_layers"]
        body.append([_label(r), f"+{q['budget']['nme']:g} / +{q['budget']['bin_nme']:g}",
                     "yes" if q["met"] else "NO", q["chosen"],
                     f"{len(layers)}: {', '.join(layers)}" if layers else "0",
                     _f(q["delta"]["balanced"], "+.3f"),
                     *[_f(q["delta"]["bins"][b], "+.3f") for b in metrics.BIN_LABELS],
                     _f(d32 and d32["balanced"], "+.3f"), _f(r["size_bytes"] / 1e6),
                     f"{_f(q['latency_ms'])} ({_f(q['fp32_latency_ms'])})", _f(q.get("seconds"), ".0f")])
    return head, body


def _sensitivity_table(report: dict, top: int = 10) -> tuple[list[str], list[list[str]]]:
    head = ["target", "layer", "NME gain if alone float", "NME with it float", "SQNR dB (fake-quant)"]
    body = []
    for r in report["targets"]:
        for x in ((r.get("quantization") or {}).get("sensitivity") or [])[:top]:
            body.append([_label(r), x["layer"], _f(x["gain"], "+.4f"), _f(x["nme_alone_float"], ".3f"),
                         _f(x["sqnr_db"], ".1f")])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        cls = ' class="fail"' if row and row[-1].startswith("FAILED") else (
            ' class="unverified"' if row and row[-1].startswith("NOT VERIFIED") else "")
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def _summary_lines(report: dict) -> list[str]:
    d = report["dataset"]
    counts = ", ".join(f"{k}: {v}" for k, v in d["bin_counts"].items())
    lines = [f"Dataset: {d['name']}, {d['count']} faces ({d['subset']}), ground truth {d['ground_truth']}; "
             f"|yaw| bins {counts}."]
    if d.get("missed"):
        lines.append(f"Pipeline mode: no detection matched the face in {len(d['missed'])} photos (not scored).")
    for m in report["models"].values():
        params = f"{m['params'] / 1e6:.3f} M params" if m.get("params") else "params ?"
        macs = f"{m['macs'] / 1e6:.1f} M MACs" if m.get("macs") else "MACs ?"
        lines.append(f"Model {m['name']} ({m['arch']}): {params}, {macs} (source arch, 120x120).")
    lines.append(f"Machine: {report['machine']['platform']}, {report['machine']['cpu_threads']} CPU threads. "
                 "Latency is the median of timed predict calls after warm-up; on a shared machine it is noisy.")
    base = ("the PyTorch reference" if report["reference"] != "none" else
            "each format's fp32 artifact (--reference none; fp32 itself: absolute limits only)")
    lines.append(f"Gates (relative limits vs {base}): {report['gates'] or 'none set'}.")
    for s in report["not_attempted"]:
        lines.append(f"Not attempted: {s['what']}: {s['reason']}")
    return lines


def render_markdown(report: dict, images: dict[str, str]) -> str:
    parts = [f"**{verdict_line(report)}**", "", *[f"- {r}" for r in report["verdict_reasons"]], "",
             "# edge3dfa validation report", "", *[f"- {s}" for s in _summary_lines(report)], "",
             "## Accuracy (NME %, AFLW2000-3D protocol)", "", _md_table(*_accuracy_table(report)), ""]
    lat = _latency_table(report)
    if lat[1]:
        parts += ["## Latency", "", _md_table(*lat), ""]
    budget, sens = _budget_table(report), _sensitivity_table(report)
    if budget[1]:
        parts += ["## Int8 within an NME budget", "", BUDGET_TEXT, "", _md_table(*budget), ""]
    if sens[1]:
        parts += ["### Most sensitive layers", "", _md_table(*sens), ""]
    if images:
        parts += ["## Plots", ""] + [f"![{k}]({v})" for k, v in images.items()] + [""]
    parts += ["## Protocol", "", *[f"- **{k}**: {v}" for k, v in report["protocol"].items()], "",
              f"Machine-readable: report.json (schema {report['schema']}).", ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;
font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,
th:first-child{text-align:left}th{background:#f3f3f3}tr.fail td{background:#fde2e2}img{max-width:48%;
margin:0.5%}.pass{color:#080}.failed{color:#b00}.unverified{color:#a60}tr.unverified td{background:#fff3d6}"""


def render_html(report: dict, pngs: dict[str, bytes]) -> str:
    cls = {"PASSED": "pass", "FAILED": "failed"}.get(report["verdict"], "unverified")
    reasons = "".join(f"<li>{html.escape(s)}</li>" for s in report["verdict_reasons"])
    items = "".join(f"<li>{html.escape(s)}</li>" for s in _summary_lines(report))
    imgs = "".join(f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}">'
                   for k, v in pngs.items())
    lat = _latency_table(report)
    budget, sens = _budget_table(report), _sensitivity_table(report)
    proto = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report["protocol"].items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{report['verdict']}: edge3dfa validation "
            f"report</title><style>{_CSS}</style></head><body><p class='{cls}'><b>{html.escape(verdict_line(report))}"
            f"</b></p>" + (f"<ul>{reasons}</ul>" if reasons else "") + "<h1>edge3dfa validation report</h1>"
            f"<ul>{items}</ul><h2>Accuracy (NME %)</h2>{_html_table(*_accuracy_table(report))}"
            + (f"<h2>Latency</h2>{_html_table(*lat)}" if lat[1] else "")
            + (f"<h2>Int8 within an NME budget</h2><p>{html.escape(BUDGET_TEXT)}</p>{_html_table(*budget)}"
               if budget[1] else "")
            + (f"<h3>Most sensitive layers</h3>{_html_table(*sens)}" if sens[1] else "")
            + (f"<h2>Plots</h2>{imgs}" if imgs else "")
            + f"<h2>Protocol</h2><ul>{proto}</ul><p>Created {html.escape(report['created'])}, edge3dfa "
            f"{html.escape(report['edge3dfa_version'])}; machine-readable: report.json ({report['schema']}).</p>"
            "</body></html>\n")


def write(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md (+ its PNGs) and report.html into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Edge3dfaError(f"report folder {out} is a file")
    pngs = _figures(report)
    links = {name: f"report_{name}.png" for name in pngs}
    files = {**{links[name]: data for name, data in pngs.items()}, "report.json": json_text(report).encode(),
             "report.md": render_markdown(report, links).encode(), "report.html": render_html(report, pngs).encode()}
    write_files(out, files)  # replaced as one set: never a new report.json beside an old report.html
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def print_summary(report: dict, file: Any = None) -> None:
    """The accuracy table as aligned text (for the terminal)."""
    import sys

    file = file or sys.stdout
    print(verdict_line(report), file=file)
    for reason in report["verdict_reasons"]:
        print(f"  {reason}", file=file)
    print(file=file)
    head, body = _accuracy_table(report)
    keep = [0, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14]
    rows = [[r[i] for i in keep] for r in [head, *body]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keep))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
    lat_head, lat_body = _latency_table(report)
    if lat_body:
        rows = [lat_head, *lat_body]
        widths = [max(len(r[i]) for r in rows) for i in range(len(lat_head))]
        print(file=file)
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
