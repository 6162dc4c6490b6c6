"""Workflows: what combines the wings, above both (converters and validation never import each other).

``convert`` is ``converters.convert`` plus the NME-budget search (``workflows.budget``), which builds int8
variants with a format's ``Int8Builder`` and judges them on held-out crops; ``export`` (``workflows.export``)
converts to every installed format, validates and reports; ``workflows.cli`` registers the ``convert`` and
``export`` commands.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from edge3dfa.converters import PARITY_COUNT, Artifact
from edge3dfa.converters import convert as convert_plain
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.workflows.budget import Budget, write_within_budget

__all__ = ["Budget", "convert", "over_budget"]


def convert(model: str | os.PathLike | Checkpoint = "mb05", to: str | Sequence[str] = "onnx",
            precision: str | Sequence[str] = "fp32", out_dir: str | os.PathLike = "out", *,
            options: Mapping[str, Any] | None = None, calibration: Any = None,
            budget: Budget | float | None = None, heldout: Any = None, parity_count: int = PARITY_COUNT,
            threads: int | None = None, verbose: bool = True, bundle: Any = None) -> list[Artifact]:
    """``converters.convert``; with ``budget`` (a ``Budget`` or its NME, e.g. 0.05), each calibrated int8
    precision becomes the fastest int8 / mixed-precision artifact whose NME on ``heldout`` (default: the held-out
    calibration crops, ``datasets.heldout``) stays within the budget of fp32 (``workflows.budget``). ``bundle``:
    phone bundles instead (``converters.convert``); the budget search does not apply to them."""
    from edge3dfa.converters import plan
    from edge3dfa.errors import Edge3dfaError

    if budget is not None and bundle is not None:
        raise Edge3dfaError("--nme-budget searches params artifacts, not phone bundles: convert without --bundle "
                            "for the search")
    if budget is None:
        return convert_plain(model, to, precision, out_dir, options=options, calibration=calibration,
                             parity_count=parity_count, threads=threads, verbose=verbose, bundle=bundle)
    if not isinstance(budget, Budget):
        budget = Budget.parse({"nme": budget})
    checked = plan(model, to, precision, options, calibration)
    if not checked.calibrated:
        raise Edge3dfaError(f"--nme-budget {budget.nme:g} chooses among int8 artifacts: add int8 to the precisions "
                            f"(asked: {', '.join(checked.precisions)})")
    model = checked.source  # opened once
    log = None if verbose else (lambda s: None)

    def write_int8(fmt: Any, source: Checkpoint, dest: Any, opts: Any, calib: Any, reference: Any) -> dict:
        return write_within_budget(fmt, source, dest, opts, calib, reference, budget, heldout=heldout, log=log)

    return convert_plain(model, to, precision, out_dir, options=options, calibration=calibration,
                         parity_count=parity_count, threads=threads, verbose=verbose, write_int8=write_int8)


def over_budget(artifacts: Sequence[Artifact]) -> list[Artifact]:
    """The artifacts built with a budget whose search did not meet it (``quantization.met`` false)."""
    return [a for a in artifacts if (a.manifest.quantization or {}).get("met") is False]

