"""Validation report: ``report.json`` (machine-readable), ``report.md`` and a self-contained ``report.html``.

report.json, schema ``edge3dfa.report/2`` (numbers are plain JSON numbers; null where not measured)::

    schema            "edge3dfa.report/2"
    verdict           "PASSED" | "FAILED" | "NOT VERIFIED" (edge3dfa.validation.gates.verdict): FAILED when a
                      target failed a gate or could not be opened, run or scored; NOT VERIFIED when nothing failed
                      but something was not checked (a target skipped by the user's choice, a gate that could not
                      be computed, no gates at all, no artifact scored); PASSED otherwise. ``validate``/``export``
                      exit 0 only for PASSED, 1 for FAILED and NOT VERIFIED.
    verdict_reasons   [one line per target that is not PASSED: what failed or was not checked]
    recommended       [per model and format: the artifact to ship, or null and why none]: the fastest PASSED
                      artifact at batch 1, one thread, ties to the smaller (edge3dfa.validation.recommend)
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
    targets           one object per target (``validation.rows.Row``), the PyTorch reference of each model first:
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
      delta_vs_reference  {balanced, mean, bins {label}, ci}: NME points minus the reference's, same faces
                      (null when validated with --reference none); ci {level, resamples, seed, method,
                      balanced [low, high], mean [low, high], bins {label: [low, high]}}: its paired bootstrap
                      interval (edge3dfa.measure.bootstrap: faces resampled within each yaw bin, the same
                      resample for both; null where a bin has under two faces). Gates compare the point estimate; the
                      interval says how far the same model could land on another draw of faces
      delta_vs_fp32       the same against this format's fp32 artifact (null if none)
      parity          {param_max_abs, param_mean_abs, landmark_max_px, landmark_mean_px, n}: vs the reference's
                      params on the same crops (landmarks in 120x120 crop pixels); null without reference
      parity_vs_fp32  the same against this format's fp32 artifact (null if none)
      latency         [{threads, batch, median_ms, p10_ms, p90_ms, min_ms, per_image_ms, runs}]; latency_note
                      says why it is empty when the runtime is only a simulation (e.g. CoreML evaluated in numpy)
      quantization    the manifest's record of an --nme-budget search (workflows.budget), null otherwise; its
                      delta carries the held-out interval the same way, and judge {rule, interval,
                      heldout_faces, smallest_budget, warning} says how "within budget" was decided
      crash_log       the traceback log of an unexpected exception, null otherwise
      gates           [{gate, value, limit, passed (true|false|null: not checked), vs (reference|fp32|null),
                       note}]
    detectors         the FaceBoxes artifacts export wrote beside the regressor's (edge3dfa.validation.detectors),
                      one per format: key, model, format, precision, status (ok|error), reason, artifact, manifest,
                      size_bytes, parity (the manifest's), seconds (conversion + parity), crash_log, summary
                      {photos, faces [[torch, artifact] per photo], faces_differ, min_box_iou, box_max_px,
                      landmark_mean_px, landmark_max_px, landmark_max_crop_px}, gates, verdict, passed; a detector
                      that is not PASSED makes the report's verdict FAILED or NOT VERIFIED. Each ``recommended``
                      entry's ``detector`` is the PASSED detector of its format, which its command names.
    bundles           the phone bundles among the targets (edge3dfa.validation.bundles): per bundle its NME and its
                      params artifact's (delta_nme with interval, gate max_bundle_delta_nme), size_bytes /
                      params_size_bytes / size_increase_pct, latency_ms / params_latency_ms / latency_increase_pct
                      (batch 1, one thread, same run), spec_landmark_mean_px / _max_px, spec_pose_max_deg (the
                      manifest's parity vs edge3dfa.runtime); a target row of a bundle carries ``bundle``
                      {contract_version, channel_order, layout, spec_parity, vs_params}
    timings           where the command's time went (``export``; null where not recorded): {total_s, steps
                      [column names: convert, parity, evaluate, latency, other], rows [{target, convert, parity,
                      evaluate, latency, other, total}], note}: wall seconds from the command's start until its
                      report is built (edge3dfa.progress.Progress.timings); each second is in exactly one cell,
                      so the rows' totals add up to total_s. target "overhead" is the time outside every target
                      (plan, data loading), "reference" the PyTorch reference; other = in a target outside its
                      steps; null = the step did not run

The report opens with the verdict and the recommendation table (what to ship per format and the command that
runs it, naming the detector of the same format), then the detector artifacts export wrote, then the plots
(edge3dfa.validation.plots: latency vs NME with the Pareto front first), the gates as a table, and the
per-target tables, whose first column is the verdict so that it is never cut off on a narrow screen. Plots are
embedded in the HTML as base64 PNG and written beside report.md for it to link.
"""

from __future__ import annotations

import base64
import html
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
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.timing import cpu_threads
from edge3dfa.validation import bundles as bundle_report
from edge3dfa.validation import detectors as detector_report
from edge3dfa.validation import plots
from edge3dfa.validation.gates import FAILED, NOT_VERIFIED, PASSED, Gates, check, row_verdict, verdict
from edge3dfa.validation.recommend import BATCH, FASTEST, THREADS, command, recommend

SCHEMA = "edge3dfa.report/2"
PROTOCOL = {
    "nme": "mean 2-D distance over 68 landmarks / sqrt(w*h) of the ground truth's 68-point box, percent",
    "bins": "|yaw| from AFLW2000-3D.pose.npy: <=30, (30,60], >60 (3DDFA benchmark_aflw2000.py; >90 goes to the last)",
    "balanced": "mean of the three bin means (as papers report); 'mean' is the plain mean over faces",
    "auc": "area under the CED curve from 0 to 7% NME, divided by 7 (1 = perfect)",
    "failure": "fraction of faces with NME > 10%",
}
PLOTS = ("latency_nme", "ced", "ced_all", "bins", "size_nme", "sensitivity")
BUDGET_TEXT = ("Made by convert --nme-budget: choices were judged on held-out AFLW calibration crops (21 points, "
               "never calibrated on), never on AFLW2000-3D; the AFLW2000-3D column is the evaluation figure of this "
               "report. Search latency: batch 1, one thread, on the converting machine. Every Δ comes with its "
               "paired bootstrap 95% interval [low, high]; 'met' means the held-out interval's upper end is within "
               "the budget (balanced and every yaw bin).")


_label = plots.label


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
        row = row.to_dict()  # a validation.rows.Row
        per_face = row.pop("per_face", None)
        row["ced"] = metrics.ced(per_face).tolist() if per_face is not None else None
        row["per_face"] = np.round(per_face, 4).tolist() if per_face is not None else None
        row["gates"] = check(row, gates.limits_for(row["format"], row["precision"])) if row["status"] == "ok" else []
        row["verdict"] = row_verdict(row)
        row["passed"] = row["verdict"] == PASSED
        targets.append(row)
    bins = metrics.yaw_bins(data.yaw)
    detectors = [detector_report.judge(d) for d in result.get("detectors", [])]
    overall = detector_report.overall(verdict(targets), detectors)
    return _round({
        "schema": SCHEMA,
        "verdict": overall,
        "verdict_reasons": _reasons(targets) + detector_report.reasons(detectors),
        "recommended": detector_report.with_detectors(recommend(targets, not_attempted), detectors),
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
        "detectors": detectors,
        "bundles": bundle_report.summary(targets),
        "timings": result.get("timings"),
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
    detectors = report.get("detectors") or []
    if detectors:
        passed = sum(d["verdict"] == PASSED for d in detectors)
        extra += f"; detectors: {passed} of {len(detectors)} passed"
    return f"Verdict: {report['verdict']} ({len(judged)} targets: {tail or 'none'}{extra})"


# ---------------------------------------------------------------- tables

def _f(x: Any, fmt: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _status(r: dict[str, Any]) -> str:
    """A row's verdict and what it rests on, for the first column of the accuracy table."""
    if r["verdict"] is None:
        return f"not judged: {r['status']}: {r['reason']}"
    if r["status"] != "ok":
        return f"{r['verdict']}: {r['status']}: {r['reason']}"
    failed = [g["gate"] for g in r["gates"] if g["passed"] is False]
    unchecked = [g["gate"] for g in r["gates"] if g["passed"] is None]
    if r["verdict"] == FAILED:
        return "FAILED: " + ", ".join(failed)
    if r["verdict"] == NOT_VERIFIED:
        why = (", ".join(unchecked) + " not checked" if unchecked else "no gates" if not r["gates"]
               else "not checked against its manifest (--no-verify)")
        return f"NOT VERIFIED: {why}"
    return r["verdict"]


def _accuracy_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["verdict", "target", "runtime", "size MB", *[f"NME {b}" for b in metrics.BIN_LABELS], "balanced",
            "mean", "AUC7", "fail>10%", "ΔNME vs torch", "ΔNME vs fp32", "param max err", "lm max px"]
    body = []
    for r in report["targets"]:
        if r["status"] != "ok":
            body.append([_status(r), _label(r), r["runtime"], _f(r["size_bytes"] and r["size_bytes"] / 1e6)]
                        + ["-"] * (len(head) - 4))
            continue
        n, d, d32 = r["nme"], r["delta_vs_reference"], r["delta_vs_fp32"]
        p = r["parity"] or r.get("parity_vs_fp32") or {}
        fail = n["failure10"]
        body.append([_status(r), _label(r), r["runtime"], _f(r["size_bytes"] and r["size_bytes"] / 1e6),
                     *[_f(n["bins"][b]["mean"]) for b in metrics.BIN_LABELS], _f(n["balanced"]), _f(n["mean"]),
                     _f(n["auc7"], ".3f"), _f(fail if fail is None else fail * 100, ".1f") + "%",
                     bootstrap.text(d), bootstrap.text(d32),
                     _f(p.get("param_max_abs"), ".2e"), _f(p.get("landmark_max_px"), ".3f")])
    return head, body


def recommended(report: dict) -> list[dict[str, Any]]:
    """The report's ``recommended`` entries (computed from its rows for a report written before the key)."""
    if "recommended" in report:
        return report["recommended"]
    return recommend(report["targets"], report.get("not_attempted"))


def _ship_table(report: dict, folder: str | os.PathLike | None = None) -> tuple[list[str], list[list[str]]]:
    """What to ship: one row per model and format; the last cell is the command (or why there is none)."""
    entries = recommended(report)
    several = len({e["model"] for e in entries}) > 1
    head = ["format", "precision", "balanced NME (Δ vs torch)", "worst yaw bin", f"ms, {THREADS} thread",
            "size MB", "run it"]
    body = []
    for e in entries:
        fmt = (f"{e['model']} {e['format']}" if several else e["format"]) + (" bundle" if e.get("bundle") else "")
        if e["artifact"] is None:
            body.append([fmt, "-", "-", "-", "-", "-", e["reason"]])
            continue
        delta = f" ({e['delta_nme']:+.3f})" if e["delta_nme"] is not None else ""
        worst = e["worst_bin"]
        body.append([fmt, e["precision"], _f(e["nme"]) + delta,
                     f"{_f(worst['nme'])} {worst['bin']}" if worst["bin"] else "-",
                     _f(e["latency_ms"]) if e["latency_ms"] is not None else "not measured",
                     _f(e["size_bytes"] and e["size_bytes"] / 1e6),
                     command(e["artifact"], folder, detector=e.get("detector"))])
    return head, body


_GATE_TEXT = {
    "max_nme": "balanced NME, %",
    "max_failure_rate": "fraction of faces above 10% NME",
    "max_delta_nme": "ΔNME balanced vs the base (a loss; one-sided)",
    "max_delta_nme_bin": "ΔNME in every yaw bin vs the base",
    "max_abs_delta_nme": "|ΔNME| balanced vs the base (two-sided)",
    "max_param_err": "max |params − base params| (normalised)",
    "max_landmark_px": "max landmark distance to the base, 120×120 crop px",
    "max_bundle_delta_nme": "phone bundles: |ΔNME| balanced vs its params artifact (two-sided)",
}


def _gates_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The limits applied, one row per (scope, gate); later scopes add to or replace earlier ones."""
    g = dict(report["gates"])
    scopes = [("every target", {k: v for k, v in g.items() if not isinstance(v, dict)})]
    scopes += [(f"precision {name}", lim) for name, lim in g.get("precision", {}).items()]
    scopes += [(f"format {name}", lim) for name, lim in g.get("format", {}).items()]
    scopes += [("command line: every artifact, over all the above", g.get("command_line", {}))]
    body = [[scope, gate, f"<= {limit:g}", _GATE_TEXT.get(gate, "")]
            for scope, lim in scopes for gate, limit in lim.items()]
    return ["applies to", "gate", "limit", "what"], body


def _gates_note(report: dict) -> str:
    base = ("the PyTorch reference" if report["reference"] != "none" else
            "each format's fp32 artifact (--reference none; fp32 itself: absolute limits only)")
    if not report["gates"]:
        return "No gates (--no-gates): nothing was judged, so the verdict is NOT VERIFIED."
    return (f"Relative limits (Δ) compare each artifact with its base, {base}; the reference rows get the absolute "
            "limits only. A precision or format row adds its limits to those above it or replaces them. Gates "
            "compare each Δ's point estimate (the default limits already sit about three standard errors above "
            "the goal); the accuracy table gives each Δ with its paired bootstrap 95% interval [low, high].")


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
        faces = (q.get("judge") or {}).get("heldout_faces")
        body.append([_label(r), f"+{q['budget']['nme']:g} / +{q['budget']['bin_nme']:g}",
                     ("yes" if q["met"] else "NO") + (f" ({faces} faces)" if faces else ""), q["chosen"],
                     f"{len(layers)}: {', '.join(layers)}" if layers else "0",
                     bootstrap.text(q["delta"]),
                     *[bootstrap.text(q["delta"], label=b) for b in metrics.BIN_LABELS],
                     bootstrap.text(d32), _f(r["size_bytes"] / 1e6),
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


def _timings_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Seconds per target and step (``timings``), and a last row of the totals."""
    t = report.get("timings")
    if not t:
        return [], []
    cols = [*t["steps"], "total"]
    body = [[r["target"], *[_f(r.get(c), ".1f") for c in cols]] for r in t["rows"]]
    sums = [sum(r.get(c) or 0.0 for r in t["rows"]) for c in t["steps"]]
    body.append(["all", *[_f(x, ".1f") for x in sums], _f(t["total_s"], ".1f")])
    return ["target", *[f"{c} s" for c in cols]], body


_TIME_NOTE = ("Wall seconds of this run, from the command's start until the report was built; overhead: outside "
              "every target (plan, data loading); other: in a target, between its steps; -: the step did not run.")


def _md_table(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _html_table(head: list[str], body: list[list[str]], css: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        cls = ' class="fail"' if row and row[0].startswith("FAILED") else (
            ' class="unverified"' if row and row[0].startswith("NOT VERIFIED") else "")
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    attr = f" class='{css}'" if css else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


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
    for s in report["not_attempted"]:
        lines.append(f"Not attempted: {s['what']}: {s['reason']}")
    return lines


_SHIP_NOTE = (f"The fastest artifact of each format that passed every gate (median ms per image at batch {BATCH}, "
              f"{THREADS} thread; equal to 0.01 ms: the smaller file); FAILED and NOT VERIFIED artifacts are never "
              "recommended. Paths are relative to this report's folder.")


def _ship_notes(report: dict) -> list[str]:
    """How each recommendation was chosen, where that is not plainly the fastest."""
    entries = recommended(report)
    several = len({e["model"] for e in entries}) > 1
    return [f"{e['model'] + ' ' if several else ''}{e['format']} {e['precision']}{' bundle' if e.get('bundle') else ''}"
            f": {e['chosen_by']}"
            for e in entries if e["artifact"] and e["chosen_by"] != FASTEST]


def render_markdown(report: dict, images: dict[str, str]) -> str:
    head, body = _ship_table(report)
    ship = _md_table(head, [[*row[:-1], f"`{row[-1]}`" if row[-1].startswith("edge3dfa ") else row[-1]]
                            for row in body]) if body else "No landmark-regressor artifact was judged."
    plots_md = [f"![{k}]({v})" for k, v in images.items()]
    parts = [f"**{verdict_line(report)}**", "", "# edge3dfa validation report", "", "## What to ship", "",
             ship, "", _SHIP_NOTE, *[f"- {n}" for n in _ship_notes(report)], ""]
    det = detector_report.table(report)
    if det[1]:
        parts += ["## Detector", "", _md_table(*det), "", detector_report.NOTE, ""]
    bundles = bundle_report.table(report)
    if bundles[1]:
        parts += ["## Phone bundles", "", _md_table(*bundles), "", bundle_report.NOTE, ""]
    if report["verdict_reasons"]:
        parts += ["## Why not PASSED", "", *[f"- {r}" for r in report["verdict_reasons"]], ""]
    if images:
        parts += ["## Plots", "", *plots_md, ""]
    parts += ["## Setting", "", *[f"- {s}" for s in _summary_lines(report)], "",
              "## Gates", "", _gates_note(report), "", _md_table(*_gates_table(report)), "",
              "## Accuracy (NME %, AFLW2000-3D protocol)", "", _md_table(*_accuracy_table(report)), ""]
    lat = _latency_table(report)
    if lat[1]:
        parts += ["## Latency", "", _md_table(*lat), ""]
    budget, sens = _budget_table(report), _sensitivity_table(report)
    if budget[1]:
        parts += ["## Int8 within an NME budget", "", BUDGET_TEXT, "", _md_table(*budget), ""]
    if sens[1]:
        parts += ["### Most sensitive layers", "", _md_table(*sens), ""]
    timings = _timings_table(report)
    if timings[1]:
        parts += ["## Time", "", _TIME_NOTE, "", _md_table(*timings), ""]
    parts += ["## Protocol", "", *[f"- **{k}**: {v}" for k, v in report["protocol"].items()], "",
              f"Machine-readable: report.json (schema {report['schema']}).", ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:1em;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:13px;margin:0.6em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}td{overflow-wrap:break-word}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
table.text td,table.text th,table.ship td:nth-child(-n+2),table.ship th:nth-child(-n+2),table.ship td:last-child,
table.ship th:last-child{text-align:left}tr.fail td{background:#fde2e2}tr.unverified td{background:#fff3d6}
.pass{color:#080}.failed{color:#b00}.unverified{color:#a60}.wide{overflow-x:auto}
.plots img{width:49%;min-width:380px;vertical-align:top}.plots img.hero{width:auto;max-width:100%}
code{font-size:12px;white-space:nowrap}p.note{font-size:12px;color:#555}details{margin:0.4em 0}
table.ship td:last-child code,table.det td:last-child{white-space:normal;overflow-wrap:anywhere}
summary{cursor:pointer;color:#246}"""


def _img(name: str, data: bytes) -> str:
    hero = ' class="hero"' if name == "latency_nme" else ""  # the headline plot: full width
    return f'<img alt="{name}"{hero} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _html_ship(report: dict) -> str:
    head, body = _ship_table(report)
    if not body:
        return "<p>No landmark-regressor artifact was judged: nothing to recommend.</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        last = html.escape(row[-1])
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
        run = f"<td><code>{last}</code></td>" if row[-1].startswith("edge3dfa ") else f"<td>{last}</td>"
        trs.append(f"<tr{' class=fail' if row[-1].startswith('none of') else ''}>{cells}{run}</tr>")
    notes = "".join(f"<br>{html.escape(n)}" for n in _ship_notes(report))
    return (f"<table class='ship'><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
            f"<p class='note'>{html.escape(_SHIP_NOTE)}{notes}</p>")


def _html_detectors(report: dict) -> str:
    head, body = detector_report.table(report)
    if not body:
        return ""
    keep = [i for i, h in enumerate(head) if h not in ("box max px", "landmark max px")]  # to read at 900 px
    head, body = [head[i] for i in keep], [[row[i] for i in keep] for row in body]
    return (f"<h2>Detector</h2><div class='wide'>{_html_table(head, body, css='text det')}</div>"
            f"<p class='note'>{html.escape(detector_report.NOTE)}</p>")


def _html_bundles(report: dict) -> str:
    head, body = bundle_report.table(report)
    if not body:
        return ""
    return (f"<h2>Phone bundles</h2><div class='wide'>{_html_table(head, body, css='text bundles')}</div>"
            f"<p class='note'>{html.escape(bundle_report.NOTE)}</p>")


def _html_plots(pngs: dict[str, bytes]) -> str:
    main = "".join(_img(k, v) for k, v in pngs.items() if k not in ("ced_all", "sensitivity"))
    out = f"<div class='plots'>{main}</div>" if main else ""
    if "ced_all" in pngs:
        out += ("<details><summary>CED of every target</summary><div class='plots'>"
                f"{_img('ced_all', pngs['ced_all'])}</div></details>")
    if "sensitivity" in pngs:
        out += f"<div class='plots'>{_img('sensitivity', pngs['sensitivity'])}</div>"
    return out


def render_html(report: dict, pngs: dict[str, bytes]) -> str:
    cls = {"PASSED": "pass", "FAILED": "failed"}.get(report["verdict"], "unverified")
    reasons = "".join(f"<li>{html.escape(s)}</li>" for s in report["verdict_reasons"])
    items = "".join(f"<li>{html.escape(s)}</li>" for s in _summary_lines(report))
    lat = _latency_table(report)
    budget, sens = _budget_table(report), _sensitivity_table(report)
    timings = _timings_table(report)
    proto = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report["protocol"].items())
    gates = _html_table(*_gates_table(report), css="text")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>{report['verdict']}: edge3dfa validation report</title><style>{_CSS}</style></head><body>"
            f"<p class='{cls}'><b>{html.escape(verdict_line(report))}</b></p>"
            f"<h2>What to ship</h2>{_html_ship(report)}"
            + _html_detectors(report) + _html_bundles(report)
            + (f"<h3>Why not PASSED</h3><ul>{reasons}</ul>" if reasons else "")
            + (f"<h2>Plots</h2>{_html_plots(pngs)}" if pngs else "")
            + f"<h2>Setting</h2><ul>{items}</ul>"
            f"<h2>Gates</h2><p>{html.escape(_gates_note(report))}</p>{gates}"
            f"<h2>Accuracy (NME %)</h2><div class='wide'>{_html_table(*_accuracy_table(report))}</div>"
            + (f"<h2>Latency</h2><div class='wide'>{_html_table(*lat)}</div>" if lat[1] else "")
            + (f"<h2>Int8 within an NME budget</h2><p>{html.escape(BUDGET_TEXT)}</p>"
               f"<div class='wide'>{_html_table(*budget)}</div>" if budget[1] else "")
            + (f"<h3>Most sensitive layers</h3>{_html_table(*sens)}" if sens[1] else "")
            + (f"<h2>Time</h2><p class='note'>{html.escape(_TIME_NOTE)}</p>{_html_table(*timings)}"
               if timings[1] else "")
            + f"<h2>Protocol</h2><ul>{proto}</ul><p>Created {html.escape(report['created'])}, edge3dfa "
            f"{html.escape(report['edge3dfa_version'])}; machine-readable: report.json ({report['schema']}).</p>"
            "</body></html>\n")


def write(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md (+ its PNGs) and report.html into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Edge3dfaError(f"report folder {out} is a file")
    pngs = plots.figures(report, recommended(report))
    links = {name: f"report_{name}.png" for name in pngs}
    files = {**{links[name]: data for name, data in pngs.items()}, "report.json": json_text(report).encode(),
             "report.md": render_markdown(report, links).encode(), "report.html": render_html(report, pngs).encode()}
    write_files(out, files)  # replaced as one set: never a new report.json beside an old report.html
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def _print_table(head: list[str], body: list[list[str]], file: Any) -> None:
    rows = [head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)


def print_summary(report: dict, file: Any = None, folder: str | os.PathLike | None = None) -> None:
    """The verdict, the accuracy and latency tables, then what to ship and the next command (for the terminal).

    ``folder``: where the report was written, so that the commands name the artifacts from the current
    directory; without it they are relative to the report's folder, and say so.
    """
    import sys

    file = file or sys.stdout
    print(verdict_line(report), file=file)
    for reason in report["verdict_reasons"]:
        print(f"  {reason}", file=file)
    print(file=file)
    head, body = _accuracy_table(report)
    keep = [1, 4, 5, 6, 7, 11, 12, 13, 14, 0]  # the verdict (and its reason, maybe long) last on a terminal
    _print_table([head[i] for i in keep], [[r[i] for i in keep] for r in body], file)
    lat_head, lat_body = _latency_table(report)
    if lat_body:
        print(file=file)
        _print_table(lat_head, lat_body, file)
    print(file=file)
    ship_head, ship_body = _ship_table(report, folder)
    print(f"What to ship (fastest passing artifact per format, batch {BATCH}, {THREADS} thread):", file=file)
    _print_table(ship_head[:-1], [row[:-1] for row in ship_body if row[1] != "-"], file)
    for row in ship_body:
        if row[1] == "-":
            print(f"{row[0]}: {row[-1]}", file=file)
    det_head, det_body = detector_report.table(report, folder)
    if det_body:
        print("\nDetector (FaceBoxes fp32, what `run --detector` takes; parity vs PyTorch on the example photos):",
              file=file)
        keep = [1, 3, 4, 6, 8, 9, 10, 0]
        _print_table([det_head[i] for i in keep], [[r[i] for i in keep] for r in det_body], file)
    commands = [row[-1] for row in ship_body if row[1] != "-"]
    if commands:
        where = "" if folder is not None else " (artifact paths relative to the report's folder)"
        print(f"Next{where}:", file=file)
        for c in commands:
            print(f"  {c}", file=file)
    else:
        print("Next: nothing passed, so nothing to run; fix or re-convert the artifacts named above.", file=file)
