"""Pass/fail limits on a validation report, and the verdict they give: PASSED, FAILED or NOT VERIFIED.

Limits come from ``DEFAULT_GATES``, a TOML file (``--gates``) and command-line options, in that order: a file
changes the limits it names and keeps the other defaults; a command-line limit applies to every artifact and wins
over both; ``--no-gates`` drops them all (nothing is judged, so the verdict is NOT VERIFIED). File format: top-level
keys apply to every artifact, tables ``[precision.NAME]`` and ``[format.NAME]`` override them (format wins)::

    max_delta_nme = 0.10          # balanced NME minus the base's, in NME points (one-sided: a loss)
    max_param_err = 0.05          # max |params - base params| (normalised params)

    [precision.int8]
    max_delta_nme = 0.30

Relative limits compare an artifact with a *base*: the PyTorch reference, or, without one (``--reference none``),
the same format's fp32 artifact. An fp32 artifact without a reference has no base: only the absolute limits
(``max_nme``, ``max_failure_rate``) apply to it, as they do to the PyTorch reference rows themselves. A relative
limit that cannot be computed (no base, a yaw bin without faces) is recorded as not checked, which makes the
verdict NOT VERIFIED. Relative limits compare the point estimate of each Δ (the report shows its paired bootstrap
interval beside it, ``measure.bootstrap``): the lossy limits are already set about three standard errors above the
goal, so gating the interval's upper end would count the same noise twice.

``DEFAULT_GATES`` (README "Default gates"; numbers from ``benchmarks/gate_limits.py`` and fp16/int8 exports):

- every target: balanced NME <= ``CEILING_NME`` and failure rate (faces above 10% NME) <=
  ``CEILING_FAILURE_RATE``; 10% balanced NME is the protocol's own failure threshold: every trained model here
  stays well below both in every mode and ground truth, every input-independent model (even the best constant
  face) far above;
- lossy precisions (everything but fp32/fp16): balanced ΔNME <= 0.10 and ΔNME <= 0.20 in every yaw bin vs the
  base: twice the project's int8 goal (+0.05 / +0.10), about three standard errors of the default 1000-face
  subset's paired ΔNME above it;
- lossless precisions (fp32, fp16): two-sided, |ΔNME| <= ``LOSSLESS_ABS_DELTA_NME`` and max landmark distance
  <= ``LOSSLESS_LANDMARK_PX`` crop pixels, 20x and 2x what fp16 measures: a conversion that is meant to change
  nothing must change nothing measurable, so a different model under the same manifest fails even when it
  scores better;
- phone bundles at a lossless precision: |ΔNME| <= ``BUNDLE_DELTA_NME`` between the bundle, scored from its own
  landmark output, and its params artifact (same format and precision; the PyTorch reference where the folder has
  none): the fused post-processing must give the landmarks the numpy runtime gives (issue 17's "done when").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edge3dfa.errors import Edge3dfaError

PASSED, FAILED, NOT_VERIFIED = "PASSED", "FAILED", "NOT VERIFIED"
#: precisions whose conversion is meant to change nothing; every other precision is lossy
LOSSLESS = ("fp32", "fp16")
#: absolute ceiling on balanced NME (%), every target, with or without a reference
CEILING_NME = 10.0
#: absolute ceiling on the fraction of faces above 10% NME
CEILING_FAILURE_RATE = 0.10
#: lossy precisions vs their base: balanced ΔNME and worst yaw bin ΔNME (points)
LOSSY_DELTA_NME, LOSSY_DELTA_NME_BIN = 0.10, 0.20
#: lossless precisions vs their base: |balanced ΔNME| (points) and max landmark distance (120x120 crop pixels)
LOSSLESS_ABS_DELTA_NME, LOSSLESS_LANDMARK_PX = 0.02, 0.5
#: a lossless phone bundle vs its params artifact: |balanced ΔNME| (points)
BUNDLE_DELTA_NME = 0.005


@dataclass(frozen=True)
class Limits:
    """One set of limits; None means not checked."""

    max_delta_nme: float | None = None  # balanced NME - the base's balanced NME (points); a loss, one-sided
    max_delta_nme_bin: float | None = None  # the same, for every yaw bin
    max_abs_delta_nme: float | None = None  # |balanced NME - the base's| (points); two-sided, for lossless parity
    max_nme: float | None = None  # balanced NME itself (percent)
    max_param_err: float | None = None  # max abs error of normalised params vs the base
    max_landmark_px: float | None = None  # max landmark distance vs the base, 120x120 crop pixels
    max_failure_rate: float | None = None  # fraction of faces with NME > 10%
    max_bundle_delta_nme: float | None = None  # a bundle: |its NME - its params artifact's| (points), two-sided

    def merged(self, other: Limits) -> Limits:
        """These limits with every limit ``other`` sets taking its place."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other)
                                if getattr(other, f.name) is not None})

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _merge_tables(a: tuple[tuple[str, Limits], ...], b: tuple[tuple[str, Limits], ...]) -> tuple:
    out = dict(a)
    for name, lim in b:
        out[name] = out.get(name, Limits()).merged(lim)
    return tuple(out.items())


@dataclass(frozen=True)
class Gates:
    default: Limits = Limits()
    precision: tuple[tuple[str, Limits], ...] = ()
    format: tuple[tuple[str, Limits], ...] = ()
    override: Limits = Limits()  # command-line limits: every artifact, over the file and the defaults

    def limits_for(self, fmt: str, precision: str) -> Limits:
        out = self.default
        for name, lim in self.precision:
            if name == precision:
                out = out.merged(lim)
        for name, lim in self.format:
            if name == fmt:
                out = out.merged(lim)
        return out.merged(self.override)

    def merged(self, other: Gates) -> Gates:
        """``other`` layered on these gates, limit by limit (a file over the defaults)."""
        return Gates(self.default.merged(other.default), _merge_tables(self.precision, other.precision),
                     _merge_tables(self.format, other.format), self.override.merged(other.override))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.default.to_dict()
        if self.precision:
            out["precision"] = {k: v.to_dict() for k, v in self.precision}
        if self.format:
            out["format"] = {k: v.to_dict() for k, v in self.format}
        if self.override.to_dict():
            out["command_line"] = self.override.to_dict()
        return out

    @property
    def empty(self) -> bool:
        return not (self.default.to_dict() or self.precision or self.format or self.override.to_dict())


_KEYS = {f.name for f in fields(Limits)}


def make_limits(values: dict[str, Any], where: str) -> Limits:
    """Limits from {name: number}; unknown names and values that are not finite numbers >= 0 are errors."""
    bad = sorted(set(values) - _KEYS)
    if bad:
        raise Edge3dfaError(f"{where}: unknown gate {bad[0]!r}; known: {', '.join(sorted(_KEYS))}")
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise Edge3dfaError(f"{where}: gate {k} must be a finite number >= 0, got {v!r}")
    return Limits(**{k: float(v) for k, v in values.items()})


def load_gates(path: str | os.PathLike) -> Gates:
    """Gates from a TOML file (format in the module docstring); a bad file is an Edge3dfaError naming it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise Edge3dfaError("reading gates.toml on Python 3.10 needs tomli: pip install tomli") from e
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise Edge3dfaError(f"gates file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise Edge3dfaError(f"{path}: not valid TOML ({e})") from None
    tables: dict[str, tuple[tuple[str, Limits], ...]] = {}
    for kind in ("precision", "format"):
        section = data.pop(kind, {})
        if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
            raise Edge3dfaError(f"{path}: [{kind}.NAME] must be tables of gates")
        tables[kind] = tuple((name, make_limits(t, f"{path} [{kind}.{name}]")) for name, t in section.items())
    return Gates(make_limits(data, str(path)), tables["precision"], tables["format"])


def _base(row: dict[str, Any]) -> tuple[str | None, dict, dict]:
    """What a row's relative limits compare with: (name, its ΔNME, its parity); the reference first."""
    if row.get("delta_vs_reference") is not None:
        return "reference", row["delta_vs_reference"], row.get("parity") or {}
    if row.get("delta_vs_fp32") is not None:
        return "fp32", row["delta_vs_fp32"], row.get("parity_vs_fp32") or {}
    return None, {}, {}


def check(row: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """Every limit that applies to one report row, as {gate, value, limit, passed, vs[, note]}.

    ``passed`` is None when the value could not be computed (the limit was not checked).
    """
    out: list[dict[str, Any]] = []

    def add(gate: str, value: float | None, limit: float | None, vs: str | None = None, note: str = "") -> None:
        if limit is None:
            return
        g: dict[str, Any] = {"gate": gate, "value": value, "limit": limit, "passed": None, "vs": vs}
        if value is None:
            g["note"] = note or "not measured"
        elif not math.isfinite(value):
            g.update(passed=False, note="not finite")
        else:
            g["passed"] = bool(value <= limit + 1e-12)
        out.append(g)

    nme = row.get("nme") or {}
    add("max_nme", nme.get("balanced"), limits.max_nme, note="balanced NME needs a face in every yaw bin")
    add("max_failure_rate", nme.get("failure10"), limits.max_failure_rate)
    if row.get("role") == "reference":
        return out
    if row.get("bundle") is not None:
        value, base = _bundle_delta(row)
        add("max_bundle_delta_nme", value, limits.max_bundle_delta_nme, base,
            "no params artifact of this format and precision, and no reference, to compare with")
    vs, delta, parity = _base(row)
    note = "no yaw bin may be empty"
    if vs is None:
        if row.get("precision") == "fp32":
            return out  # without a reference, fp32 is the base of its format: absolute limits only
        note = "no reference (--reference none) and no fp32 artifact of this format to compare with"
    bins = list((delta.get("bins") or {}).values())
    balanced = delta.get("balanced")
    add("max_delta_nme", balanced, limits.max_delta_nme, vs, note)
    add("max_delta_nme_bin", max(bins) if bins and None not in bins else None, limits.max_delta_nme_bin, vs, note)
    add("max_abs_delta_nme", None if balanced is None else abs(balanced), limits.max_abs_delta_nme, vs, note)
    add("max_param_err", parity.get("param_max_abs"), limits.max_param_err, vs, note)
    add("max_landmark_px", parity.get("landmark_max_px"), limits.max_landmark_px, vs, note)
    return out


def _bundle_delta(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """|balanced ΔNME| of a bundle vs its params artifact (else the reference), and what it compares with."""
    vs_params = (row["bundle"].get("vs_params") or {}).get("delta") or {}
    if vs_params.get("balanced") is not None:
        return abs(vs_params["balanced"]), "params artifact"
    ref = (row.get("delta_vs_reference") or {}).get("balanced")
    return (abs(ref), "reference") if ref is not None else (None, None)


def row_verdict(row: dict[str, Any]) -> str | None:
    """PASSED / FAILED / NOT VERIFIED for one checked row; None for rows outside what is judged."""
    if row["status"] == "error":
        return FAILED
    if row["status"] == "skipped":
        return NOT_VERIFIED
    if row["status"] != "ok":
        return None  # e.g. a detector in the folder: validate scores landmark regressors only
    if any(g["passed"] is False for g in row["gates"]):
        return FAILED
    if row.get("manifest_verified") is False:  # --no-verify: the scores may be of another file than claimed
        return NOT_VERIFIED
    if not row["gates"] or any(g["passed"] is None for g in row["gates"]):
        return NOT_VERIFIED
    return PASSED


def verdict(rows: list[dict[str, Any]]) -> str:
    """FAILED if any row failed; else NOT VERIFIED if any row was not verified or no artifact was; else PASSED."""
    verdicts = [r["verdict"] for r in rows]
    if FAILED in verdicts:
        return FAILED
    if NOT_VERIFIED in verdicts or not any(r["role"] == "artifact" and r["verdict"] for r in rows):
        return NOT_VERIFIED
    return PASSED


_LOSSY = Limits(max_delta_nme=LOSSY_DELTA_NME, max_delta_nme_bin=LOSSY_DELTA_NME_BIN)
_LOSSLESS = Limits(max_abs_delta_nme=LOSSLESS_ABS_DELTA_NME, max_landmark_px=LOSSLESS_LANDMARK_PX,
                   max_bundle_delta_nme=BUNDLE_DELTA_NME)
DEFAULT_GATES = Gates(Limits(max_nme=CEILING_NME, max_failure_rate=CEILING_FAILURE_RATE).merged(_LOSSY),
                      precision=tuple((p, _LOSSLESS) for p in LOSSLESS))
