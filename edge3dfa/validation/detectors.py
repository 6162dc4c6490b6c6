"""The detector in a report: the FaceBoxes artifacts ``export`` writes beside the regressor's, judged on their parity.

A device runs two models, the landmark regressor and FaceBoxes (``edge3dfa run --artifact R --detector D``), so
``export`` converts the detector too (``edge3dfa.workflows.detector``) and the report lists each detector artifact
with its verdict, its parity and the command that runs it with the recommended regressor of the same format.

Parity is what the manifest records (``measure.parity.detector_parity``: PyTorch FaceBoxes vs the artifact on the
example photos, at the artifact's input size). The detector is converted at fp32, a conversion meant to change
nothing, so its limits are the lossless ones (``DETECTOR_LIMITS``):

- ``faces_differ``: photos where the artifact finds a different number of faces than PyTorch: 0;
- ``min_box_iou``: the smallest IoU of a PyTorch box with the artifact's matching box: at least 0.99, which
  for a 100 px face is about a quarter pixel per edge;
- ``landmark_max_crop_px``: the regressor's landmarks on the crops cut from the artifact's boxes vs from PyTorch's,
  the largest distance in 120x120 crop pixels: the regressors' fp32 limit (``gates.LOSSLESS_LANDMARK_PX``).

Verdict, as for the regressors (a verdict never lies): FAILED when the conversion failed or a figure breaks its
limit or is not finite; NOT VERIFIED when a figure could not be measured (no photo measured, a photo where neither
finds a face, no landmark figures); PASSED otherwise. The report's verdict is FAILED or NOT VERIFIED whenever a
detector's is (``overall``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from edge3dfa.validation.gates import FAILED, LOSSLESS_LANDMARK_PX, NOT_VERIFIED, PASSED
from edge3dfa.validation.recommend import command

#: gate -> (limit, "max" or "min"): what a detector artifact must meet (module docstring)
DETECTOR_LIMITS: dict[str, tuple[float, str]] = {
    "faces_differ": (0, "max"),
    "min_box_iou": (0.99, "min"),
    "landmark_max_crop_px": (LOSSLESS_LANDMARK_PX, "max"),
}
_GATE_TEXT = {
    "faces_differ": "photos where the artifact finds another number of faces than PyTorch",
    "min_box_iou": "smallest IoU of a PyTorch box with the artifact's",
    "landmark_max_crop_px": "regressor landmarks, artifact's boxes vs PyTorch's, max, 120x120 crop px",
}


@dataclass(frozen=True, kw_only=True)
class DetectorRow:
    """One detector artifact of a report, before it is judged (report.json ``detectors``, one entry each)."""

    key: str
    model: str
    format: str
    precision: str
    status: Literal["ok", "error"] = "ok"
    reason: str | None = None
    artifact: str | None = None  # relative to the report
    manifest: str | None = None
    size_bytes: int = 0
    parity: dict[str, Any] | None = None  # the manifest's (measure.parity.detector_parity)
    seconds: float | None = None  # conversion + parity, on the exporting machine
    crash_log: str | None = None
    bundle: bool = False  # a detector phone bundle (export --bundle), beside the params detector of its format

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def summary(parity: dict[str, Any] | None) -> dict[str, Any]:
    """The figures judged, over every photo of ``parity`` (None where not measured on some photo)."""
    photos = [v for k, v in (parity or {}).items() if k.startswith("photo ") and isinstance(v, dict)]

    def over(key: str, pick: Any) -> float | None:
        values = [p.get(key) for p in photos]
        if not values or None in values:
            return None
        values = [float(v) for v in values]  # min/max skip a NaN after the first value: it must show, not hide
        return pick(values) if all(map(math.isfinite, values)) else math.nan

    faces = [p.get("faces") or [] for p in photos]
    weights = [f[0] if f else 0 for f in faces]
    means = [p.get("landmark_mean_px") for p in photos]
    mean = (None if not photos or None in means or not sum(weights)
            else sum(m * w for m, w in zip(means, weights)) / sum(weights))
    return {"photos": len(photos), "faces": faces,
            "faces_differ": sum(len(f) != 2 or f[0] != f[1] for f in faces) if photos else None,
            "min_box_iou": over("box_min_iou", min), "box_max_px": over("box_max_px", max),
            "landmark_mean_px": mean, "landmark_max_px": over("landmark_max_px", max),
            "landmark_max_crop_px": over("landmark_max_crop_px", max)}


def _gate(name: str, value: float | None) -> dict[str, Any]:
    limit, sense = DETECTOR_LIMITS[name]
    g: dict[str, Any] = {"gate": name, "value": value, "limit": limit, "passed": None, "vs": "reference"}
    if value is None:
        g["note"] = "not measured"
    elif not math.isfinite(value):
        g.update(passed=False, note="not finite")
    else:
        g["passed"] = bool(value <= limit + 1e-12 if sense == "max" else value >= limit - 1e-12)
    return g


def judge(row: DetectorRow) -> dict[str, Any]:
    """The report entry of one detector artifact: its fields, ``summary``, ``gates`` and ``verdict``."""
    out = row.to_dict()
    out["summary"] = summary(row.parity) if row.status == "ok" else None
    out["gates"] = [_gate(name, out["summary"][name]) for name in DETECTOR_LIMITS] if out["summary"] else []
    if row.status != "ok" or any(g["passed"] is False for g in out["gates"]):
        out["verdict"] = FAILED
    elif any(g["passed"] is None for g in out["gates"]):
        out["verdict"] = NOT_VERIFIED
    else:
        out["verdict"] = PASSED
    out["passed"] = out["verdict"] == PASSED
    return out


def overall(verdict: str, detectors: list[dict[str, Any]]) -> str:
    """The report's verdict from the regressors' ``verdict`` and the judged detectors: the worst of them."""
    rank = [PASSED, NOT_VERIFIED, FAILED]
    return max([verdict, *(d["verdict"] for d in detectors)], key=rank.index)


def _gate_text(g: dict[str, Any]) -> str:
    if g["passed"] is None:
        return f"{g['gate']} not checked ({g.get('note', 'not measured')})"
    value = "not finite" if g["value"] is None or not math.isfinite(g["value"]) else format(g["value"], ".4g")
    sense = "<" if DETECTOR_LIMITS[g["gate"]][1] == "min" else ">"
    return f"{g['gate']} {value} {sense} {g['limit']:g}"


def label(d: dict[str, Any]) -> str:
    return f"detector {d['model']} {d['format']} {d['precision']}{' bundle' if d.get('bundle') else ''}"


def reasons(detectors: list[dict[str, Any]]) -> list[str]:
    """One line per detector that is not PASSED (report.json ``verdict_reasons``)."""
    out = []
    for d in detectors:
        if d["verdict"] == PASSED:
            continue
        who = label(d) + (f" ({Path(d['artifact']).name})" if d.get("artifact") else "")
        if d["status"] != "ok":
            out.append(f"{who}: {d['status']}: {d['reason']}")
        else:
            bad = [g for g in d["gates"] if g["passed"] is False] or [g for g in d["gates"] if g["passed"] is None]
            out.append(f"{who}: " + "; ".join(_gate_text(g) for g in bad))
    return out


def with_detectors(recommended: list[dict[str, Any]], detectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's ``recommended`` entries, each with ``detector``: the PASSED detector artifact of its format (path
    relative to the report; null when there is none) that its ``command`` then names with ``--detector``."""
    passed = {(d["format"], bool(d.get("bundle"))): d["artifact"] for d in detectors
              if d["verdict"] == PASSED and d.get("artifact")}
    out = []
    for e in recommended:  # a bundle entry names the detector bundle where one passed, else the params detector
        fmt, bundle = e["format"], bool(e.get("bundle"))
        det = (passed.get((fmt, bundle)) or passed.get((fmt, False))) if e.get("artifact") else None
        cmd = command(e["artifact"], detector=det) if e.get("artifact") else e.get("command")
        out.append({**e, "detector": det, "command": cmd})
    return out


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: dict[str, Any], folder: str | os.PathLike | None = None) -> tuple[list[str], list[list[str]]]:
    """The detector artifacts: verdict, figures, what the conversion took, where the artifact is."""
    head = ["verdict", "detector", "size MB", "faces torch=artifact", "min box IoU", "box max px",
            "landmark mean px", "landmark max px", "landmark max crop px", "convert s", "artifact"]
    body = []
    for d in report.get("detectors") or []:
        where = d.get("artifact") or "-"
        if folder is not None and d.get("artifact"):
            where = os.path.normpath(os.path.join(folder, d["artifact"]))
        s = d.get("summary") or {}
        if d["status"] != "ok":
            status = f"{d['verdict']}: {d['status']}: {d['reason']}"
        elif d["verdict"] == FAILED:
            status = f"{FAILED}: " + ", ".join(g["gate"] for g in d["gates"] if g["passed"] is False)
        elif d["verdict"] == NOT_VERIFIED:
            status = f"{NOT_VERIFIED}: " + ", ".join(g["gate"] for g in d["gates"] if g["passed"] is None) + \
                " not measured"
        else:
            status = d["verdict"]
        faces = ", ".join("=".join(map(str, f)) for f in s.get("faces") or []) or "-"
        body.append([status, label(d), _f(d["size_bytes"] / 1e6 if d["size_bytes"] else None, ".2f"), faces,
                     _f(s.get("min_box_iou"), ".6f"), _f(s.get("box_max_px"), ".2g"),
                     _f(s.get("landmark_mean_px"), ".3g"), _f(s.get("landmark_max_px"), ".3g"),
                     _f(s.get("landmark_max_crop_px"), ".3g"), _f(d.get("seconds"), ".1f"), where])
    return head, body


NOTE = ("FaceBoxes, converted by export at fp32 next to the regressor's artifacts; parity vs PyTorch FaceBoxes on "
        "the example photos at the artifact's input size (its manifest's parity): faces found, box IoU, and what the "
        "boxes change downstream, the regressor's landmarks on the crops cut from them (photo px; crop px of "
        "120x120). Limits: " + "; ".join(f"{k} {'>=' if s == 'min' else '<='} {v:g} ({_GATE_TEXT[k]})"
                                          for k, (v, s) in DETECTOR_LIMITS.items())
        + ". The commands under 'What to ship' name the PASSED detector of their format.")
