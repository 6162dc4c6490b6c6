"""Run a target over many crops: the one batched loop behind parity, validation and the NME-budget search."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

from edge3dfa.target import Target

BATCH = 64


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "it") -> Iterable:
    """A tqdm bar on stderr when it is a terminal (``disable=None``), else the items as they are."""
    if not desc:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None, file=sys.stderr)


def predict_all(target: Target, x: np.ndarray, batch: int = BATCH, desc: str = "") -> np.ndarray:
    """Normalised params [N,62] of ``target`` on all crops, ``batch`` at a time (a bar when ``desc`` is given)."""
    starts = range(0, len(x), batch)
    return np.concatenate([target.predict(x[i:i + batch]) for i in progress(starts, desc, len(starts), "batch")])


def predict_bundle_all(target: Target, x: np.ndarray, batch: int = BATCH, desc: str = "") -> dict[str, np.ndarray]:
    """A regressor bundle's outputs by name (``Target.predict_bundle``) on all crops, ``batch`` at a time."""
    starts = range(0, len(x), batch)
    outs = [target.predict_bundle(x[i:i + batch]) for i in progress(starts, desc, len(starts), "batch")]
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}
