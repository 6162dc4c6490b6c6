"""Pass/fail limits on a validation report: a failed gate makes ``validate`` / ``export`` exit with 1.

Limits come from the command line or a TOML file. Top-level keys apply to every artifact; tables
``[precision.NAME]`` and ``[format.NAME]`` override them for that precision or format (format wins)::

    max_delta_nme = 0.10          # balanced NME minus the PyTorch reference's, in NME points
    max_param_err = 0.05          # max |params - reference params| (normalised params)

    [precision.int8]
    max_delta_nme = 0.30

The PyTorch reference rows themselves are only held to ``max_nme`` and ``max_failure_rate``.

Without any gate given, ``DEFAULT_GATES`` apply: a lossless precision (fp32, fp16) must stay within 0.10
NME points of PyTorch (anything more is a conversion bug), a lossy one within 0.50 (normal int8 costs
0.1-0.4 on mb05; a broken quantization costs whole points).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edge3dfa.errors import Edge3dfaError


@dataclass(frozen=True)
class Limits:
    """One set of limits; None means not checked."""

    max_delta_nme: float | None = None  # balanced NME - reference balanced NME (points)
    max_delta_nme_bin: float | None = None  # the same, for every yaw bin
    max_nme: float | None = None  # balanced NME itself (percent)
    max_param_err: float | None = None  # max abs error of normalised params vs the reference
    max_landmark_px: float | None = None  # max landmark distance vs the reference, 120x120 crop pixels
    max_failure_rate: float | None = None  # fraction of faces with NME > 10%

    def merged(self, other: Limits) -> Limits:
        """These limits with every limit ``other`` sets taking its place."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other)
                                if getattr(other, f.name) is not None})

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Gates:
    default: Limits = Limits()
    precision: tuple[tuple[str, Limits], ...] = ()
    format: tuple[tuple[str, Limits], ...] = ()

    def limits_for(self, fmt: str, precision: str) -> Limits:
        out = self.default
        for name, lim in self.precision:
            if name == precision:
                out = out.merged(lim)
        for name, lim in self.format:
            if name == fmt:
                out = out.merged(lim)
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.default.to_dict()
        if self.precision:
            out["precision"] = {k: v.to_dict() for k, v in self.precision}
        if self.format:
            out["format"] = {k: v.to_dict() for k, v in self.format}
        return out

    @property
    def empty(self) -> bool:
        return not (self.default.to_dict() or self.precision or self.format)


_KEYS = {f.name for f in fields(Limits)}


def _limits(table: dict[str, Any], where: str) -> Limits:
    bad = sorted(set(table) - _KEYS)
    if bad:
        raise Edge3dfaError(f"{where}: unknown gate {bad[0]!r}; known: {', '.join(sorted(_KEYS))}")
    for k, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Edge3dfaError(f"{where}: gate {k} must be a number, got {v!r}")
    return Limits(**{k: float(v) for k, v in table.items()})


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
        tables[kind] = tuple((name, _limits(t, f"{path} [{kind}.{name}]")) for name, t in section.items())
    return Gates(_limits(data, str(path)), tables["precision"], tables["format"])


def check(row: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """Every limit that applies to one report row, as {gate, value, limit, passed}."""
    out = []
    is_ref = row.get("role") == "reference"

    def add(gate: str, value: float | None, limit: float | None) -> None:
        if limit is None:
            return
        ok = value is not None and value <= limit + 1e-12
        out.append({"gate": gate, "value": value, "limit": limit, "passed": bool(ok)})

    nme = row.get("nme") or {}
    add("max_nme", nme.get("balanced"), limits.max_nme)
    add("max_failure_rate", nme.get("failure10"), limits.max_failure_rate)
    if is_ref:
        return out
    delta = row.get("delta_vs_reference")
    if delta is not None:  # None only when scored without a reference (--reference none)
        add("max_delta_nme", delta.get("balanced"), limits.max_delta_nme)
        if limits.max_delta_nme_bin is not None:
            bins = [v for v in (delta.get("bins") or {}).values() if v is not None]
            add("max_delta_nme_bin", max(bins) if bins else None, limits.max_delta_nme_bin)
    parity = row.get("parity")
    if parity is not None:
        add("max_param_err", parity.get("param_max_abs"), limits.max_param_err)
        add("max_landmark_px", parity.get("landmark_max_px"), limits.max_landmark_px)
    return out


DEFAULT_GATES = Gates(Limits(max_delta_nme=0.50),
                      precision=(("fp32", Limits(max_delta_nme=0.10)), ("fp16", Limits(max_delta_nme=0.10))))
