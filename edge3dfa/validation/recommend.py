"""What to ship: per model and format, the recommended artifact of a validation report (``report.json``
``recommended``), chosen from the report's rows alone.

Rule (issue 19, "the verdict first"): among the artifacts of one model and format whose verdict is PASSED, the
fastest at batch 1 on one thread (the median ``validate`` measured); medians equal at the 0.01 ms the report
shows are a tie, which goes to the smaller file. A FAILED or NOT VERIFIED artifact is never recommended, however
fast: its accuracy is wrong or unknown. When no passing artifact of a format was timed (CoreML is only evaluated
in numpy on Linux, or ``--latency-runs 0``), the smallest passing one is recommended and the entry says it was
chosen by size. A format with no passing artifact gets an entry without an artifact that says so, as does a
format ``export`` did not attempt.

Entry (one per model and format, in the report's order)::

    model, format       the model's zoo name and the format; bundle: true for the entry of its phone bundles
                        (``--bundle``), which are recommended apart from its params artifacts
    artifact, key, precision   the recommended artifact (path relative to the report) or null
    nme                 its balanced NME (percent); delta_nme: minus the reference's (null without one)
    worst_bin           {bin, nme}: the yaw bin with the highest NME
    latency_ms          median ms per image at batch 1, 1 thread (null: not timed); size_bytes
    chosen_by           why this one ("fastest ...", "tied ..., smaller", "smallest: latency not measured")
    command             the command that runs it (``edge3dfa run photo.jpg --artifact ...``), or null
    passed, judged      how many of this format's artifacts passed, and were judged
    reason              null when an artifact is recommended; else why none is
"""

from __future__ import annotations

import math
import os
import shlex
from collections import Counter
from typing import Any

from edge3dfa.validation.gates import PASSED

#: latency is compared at this (batch, threads): one face at a time on one core, the Pi's case
BATCH, THREADS = 1, 1
#: medians that round to the same value at this resolution (what the report tables show) are a tie
LATENCY_RESOLUTION_MS = 0.01
#: ``chosen_by`` of a plain pick, the fastest with no tie
FASTEST = f"fastest passing (batch {BATCH}, {THREADS} thread)"


def latency_ms(row: dict[str, Any], batch: int = BATCH, threads: int = THREADS) -> float | None:
    """Median ms per image of a row at ``batch`` and ``threads``; None when that setting was not timed."""
    for lat in row.get("latency") or []:
        if lat.get("batch") == batch and lat.get("threads") == threads and lat.get("per_image_ms") is not None:
            value = float(lat["per_image_ms"])
            return value if math.isfinite(value) else None
    return None


def command(artifact: str, folder: str | os.PathLike | None = None, image: str = "photo.jpg",
            detector: str | None = None) -> str:
    """The command line that runs ``artifact`` (a path relative to the report's ``folder``, when given), with the
    FaceBoxes artifact ``detector`` (a path relative to the same folder) when given."""
    def where(path: str) -> str:
        return shlex.quote(os.path.normpath(os.path.join(folder, path)) if folder is not None else path)

    line = f"edge3dfa run {image} --artifact {where(artifact)}"
    return line + f" --detector {where(detector)}" if detector else line


def _worst_bin(row: dict[str, Any]) -> dict[str, Any]:
    bins = {k: v["mean"] for k, v in ((row.get("nme") or {}).get("bins") or {}).items() if v.get("mean") is not None}
    if not bins:
        return {"bin": None, "nme": None}
    label = max(bins, key=lambda k: bins[k])
    return {"bin": label, "nme": bins[label]}


def _rank(row: dict[str, Any]) -> tuple:
    lat = latency_ms(row)
    size = row.get("size_bytes")
    return (lat is None, 0 if lat is None else round(lat / LATENCY_RESOLUTION_MS),
            math.inf if size is None else size, row["key"])


def _chosen_by(best: dict[str, Any], passing: list[dict[str, Any]]) -> str:
    lat = latency_ms(best)
    if lat is None:
        return "smallest passing: latency not measured" + (f" ({best['latency_note']})"
                                                           if best.get("latency_note") else "")
    tied = [r for r in passing if r is not best and _rank(r)[:2] == _rank(best)[:2]]
    if tied:
        return f"{FASTEST}, tied with {len(tied)} other(s) at {lat:.2f} ms: the smallest of them"
    return FASTEST


def _none_passed(rows: list[dict[str, Any]]) -> str:
    counts = Counter(r["verdict"] for r in rows)
    what = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    return f"none of its {len(rows)} artifact(s) passed ({what}): nothing to ship"


def _entry(model: str, fmt: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    passing = sorted((r for r in rows if r["verdict"] == PASSED and r["status"] == "ok"), key=_rank)
    out: dict[str, Any] = {"model": model, "format": fmt, "artifact": None, "key": None, "precision": None,
                           "nme": None, "delta_nme": None, "worst_bin": {"bin": None, "nme": None},
                           "latency_ms": None, "size_bytes": None, "chosen_by": None, "command": None,
                           "passed": len(passing), "judged": len(rows), "reason": None}
    if not passing:
        out["reason"] = _none_passed(rows)
        return out
    best = passing[0]
    delta = best.get("delta_vs_reference") or {}
    out.update(artifact=best["artifact"], key=best["key"], precision=best["precision"],
               nme=best["nme"]["balanced"], delta_nme=delta.get("balanced"), worst_bin=_worst_bin(best),
               latency_ms=latency_ms(best), size_bytes=best.get("size_bytes"), chosen_by=_chosen_by(best, passing),
               command=command(best["artifact"]) if best.get("artifact") else None)
    return out


def recommend(targets: list[dict[str, Any]], not_attempted: list[dict[str, str]] | None = None) -> list[dict]:
    """One entry per model and format of the judged artifacts (module docstring), then formats not attempted."""
    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for r in targets:  # a phone bundle is its own entry: an app ships one or the other
        if r.get("role") == "artifact" and r.get("verdict") is not None:
            groups.setdefault((r["model"], r["format"], r.get("bundle") is not None), []).append(r)
    out = [{**_entry(model, fmt, rows), "bundle": bundle} for (model, fmt, bundle), rows in groups.items()]
    models = list(dict.fromkeys(model for model, _, _ in groups)) or [None]
    formats = {fmt for _, fmt, _ in groups}
    for skip in not_attempted or []:
        fmt = skip["what"]
        if " " in fmt or fmt in formats:  # one precision left out: the format still has its entry
            continue
        for model in models:
            entry = {**_entry(model, fmt, []), "bundle": False}
            entry["reason"] = f"not attempted: {skip['reason']}"
            out.append(entry)
    return out
