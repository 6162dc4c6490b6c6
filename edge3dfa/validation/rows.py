"""One target of a validation report, as the harness scores it: a typed record, not a hand-typed dict.

``Row.to_dict()`` gives the object ``report.build`` turns into one entry of report.json's ``targets`` (it adds
``ced``, ``gates``, ``verdict`` and ``passed``); the field order is the JSON key order, so a field added here
appears in every report at its place, and a misspelt field is a TypeError instead of a key nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

#: ok; error (could not be converted, opened, run or scored); skipped (the user's choice, e.g.
#: --skip-unavailable); not_applicable (not a landmark regressor, e.g. a detector: not judged)
Status = Literal["ok", "error", "skipped", "not_applicable"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Row:
    """A report row before gates are checked (report.json schema: ``edge3dfa.validation.report``). Compared by
    identity: field-wise equality would compare ``per_face`` arrays element by element."""

    key: str
    role: Literal["reference", "artifact"]
    status: Status = "ok"
    reason: str | None = None
    model: str
    format: str
    precision: str
    runtime: str = "-"
    artifact: str | None = None  # paths relative to the report
    manifest: str | None = None
    size_bytes: int = 0
    source_sha256: str | None = None
    nme: dict[str, Any] | None = None  # metrics.summarize
    delta_vs_reference: dict[str, Any] | None = None
    delta_vs_fp32: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None  # measure.parity.compare
    parity_vs_fp32: dict[str, Any] | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)  # measure.timing.measure
    latency_note: str | None = None
    per_face: np.ndarray | None = None  # NME percent per face, in the dataset's order
    quantization: dict[str, Any] | None = None  # the --nme-budget search record of the manifest
    crash_log: str | None = None
    manifest_verified: bool | None = None  # False: used with --no-verify; None: no manifest (reference)
    #: a phone bundle's record (None: a params artifact): channel_order, layout, contract_version, spec_parity (the
    #: manifest's landmarks/pose vs the executable spec per parity set) and vs_params (its params artifact of the
    #: same format and precision: key, artifact, ΔNME with interval; null when there is none)
    bundle: dict[str, Any] | None = None

    def failed(self, reason: str, crash_log: str | None = None) -> Row:
        """This row as status error, for ``reason``."""
        return replace(self, status="error", reason=reason, crash_log=crash_log)

    def to_dict(self) -> dict[str, Any]:
        """The fields in report.json's order (values as they are: ``report.build`` rounds them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
