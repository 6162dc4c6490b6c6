"""The report's "Phone bundles" section: what a bundle costs and whether it says what its params artifact says.

A phone bundle (``edge3dfa.bundle``) is the params network with the post-processing fused in (uint8 image in,
landmarks / pose / params out). The harness scores it from its own landmark output (``harness._score_landmarks``)
and pairs it with its params artifact: the same model, format and precision converted without ``--bundle``
(``harness._compare_bundles``). Per bundle this section gives, from the rows alone:

- accuracy: its balanced NME, its params artifact's, and the paired Δ with its interval; at a lossless precision
  the gate ``max_bundle_delta_nme`` (``validation.gates``) fails a bundle whose landmarks drift from the params';
- cost: file size and batch-1, one-thread latency of the bundle against the params artifact, measured in the same
  run (the bundle timed on its own uint8 input, as an app calls it: ``Target.predict_image``), in ms and percent;
- parity vs the executable spec: the manifest's landmark (crop px) and pose (degrees) distance to
  ``edge3dfa.runtime`` on the parity sets (``measure.parity.bundle_parity``).

report.json ``bundles``: one object per bundle row, keys as ``summary`` builds them; null where not measured.
"""

from __future__ import annotations

from typing import Any

from edge3dfa.measure import bootstrap
from edge3dfa.validation.recommend import latency_ms

NOTE = ("A phone bundle is scored from its own landmark output, mapped to the photo with each crop's roi by the "
        "two lines of its contract (edge3dfa.bundle.to_photo), and compared with its params artifact (same format "
        "and precision, scored through the numpy runtime): ΔNME with its paired bootstrap 95% interval; at fp32 "
        "|ΔNME| must stay within the gate max_bundle_delta_nme. Size and latency (batch 1, one thread, the same "
        "run; the bundle on its uint8 input) are the cost of the fused post-processing. 'vs spec': the manifest's "
        "distance of the bundle's landmarks (mean / max, 120x120 crop px) and pose (max, degrees) to "
        "edge3dfa.runtime.")


def _pct(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else 100.0 * (value - base) / base


def _worst(spec_parity: dict[str, dict], key: str) -> float | None:
    vals = [fig.get(key) for fig in spec_parity.values() if fig.get(key) is not None]
    return max(vals) if vals else None


def summary(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per bundle row of a report (module docstring); ``targets`` are report.json's rows."""
    by_key = {r["key"]: r for r in targets}
    out = []
    for r in targets:
        b = r.get("bundle")
        if r.get("role") != "artifact" or b is None:
            continue
        vs = b.get("vs_params") or {}
        base = by_key.get(vs.get("key")) if vs else None
        gate = next((g for g in r.get("gates") or [] if g["gate"] == "max_bundle_delta_nme"), None)
        size, base_size = r.get("size_bytes") or None, (base or {}).get("size_bytes") or None
        ms, base_ms = latency_ms(r), latency_ms(base) if base else None
        spec = b.get("spec_parity") or {}
        out.append({
            "key": r["key"], "model": r["model"], "format": r["format"], "precision": r["precision"],
            "artifact": r.get("artifact"), "status": r["status"], "verdict": r.get("verdict"),
            "channel_order": b.get("channel_order"), "layout": b.get("layout"),
            "params_key": vs.get("key"), "params_artifact": vs.get("artifact"),
            "nme": (r.get("nme") or {}).get("balanced"), "params_nme": ((base or {}).get("nme") or {}).get("balanced"),
            "delta_nme": vs.get("delta"), "gate": gate,
            "size_bytes": size, "params_size_bytes": base_size,
            "size_increase_bytes": None if size is None or base_size is None else size - base_size,
            "size_increase_pct": _pct(size, base_size),
            "latency_ms": ms, "params_latency_ms": base_ms,
            "latency_increase_ms": None if ms is None or base_ms is None else ms - base_ms,
            "latency_increase_pct": _pct(ms, base_ms),
            "spec_landmark_mean_px": _worst(spec, "bundle_landmark_mean_px"),
            "spec_landmark_max_px": _worst(spec, "bundle_landmark_max_px"),
            "spec_pose_max_deg": _worst(spec, "pose_max_deg"),
            "spec_parity": spec,
        })
    return out


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Six columns, to read at 900 px: verdict first (as every table of the report), then the bundle."""
    head = ["verdict", "bundle", "NME bundle / params (Δ [95% CI])", "size MB (+%)", "b1 1t ms bundle / params (+%)",
            "vs spec: lm mean / max px, pose max °"]
    body = []
    for b in report.get("bundles") or []:
        gate = b.get("gate")
        verdict = b["verdict"] or "-"
        if gate and gate.get("passed") is False:
            verdict += f": |ΔNME| {gate['value']:.4f} > {gate['limit']:g}"
        elif b["status"] != "ok":
            verdict += f": {b['status']}"
        params = "no params artifact" if b["params_key"] is None else _f(b["params_nme"], ".3f")
        delta = f" ({bootstrap.text(b['delta_nme'], nd=4)})" if b.get("delta_nme") else ""
        size = _f(b["size_bytes"] and b["size_bytes"] / 1e6, ".2f") + (
            f" ({b['size_increase_pct']:+.1f}%)" if b["size_increase_pct"] is not None else "")
        lat = (f"{_f(b['latency_ms'], '.2f')} / {_f(b['params_latency_ms'], '.2f')}"
               + (f" ({b['latency_increase_pct']:+.0f}%)" if b["latency_increase_pct"] is not None else ""))
        spec = (f"{_f(b['spec_landmark_mean_px'], '.1e')} / {_f(b['spec_landmark_max_px'], '.1e')}, "
                f"{_f(b['spec_pose_max_deg'], '.1e')}")
        name = f"{b['model']} {b['format']} {b['precision']} ({b['channel_order'] or '?'})"
        body.append([verdict, name, f"{_f(b['nme'], '.3f')} / {params}{delta}", size, lat, spec])
    return head, body
