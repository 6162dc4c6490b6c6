"""Shared test helpers and fixtures. Real assets come through EDGE3DFA_ASSETS (default: ../shared/assets).

Independent references live here once: AFLW2000-3D crops read with OpenCV (not through the converters' loaders),
landmarks in crop pixels from the numpy runtime, a subprocess runner for the CLI. Heavy tests (conversions,
full-dataset runs) are marked ``slow``; ``make test-fast`` leaves them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EDGE3DFA_ASSETS", str(ROOT.parent / "shared" / "assets"))
ASSETS = Path(os.environ["EDGE3DFA_ASSETS"])


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    assert ASSETS.is_dir(), f"EDGE3DFA_ASSETS={ASSETS} is not a folder"
    return ASSETS


def eval_crops(start: int, count: int) -> np.ndarray:
    """AFLW2000-3D crops [count,3,120,120] in protocol order, read here with OpenCV (not the converters' loaders)."""
    from edge3dfa import assets, runtime

    folder = assets.fetch("aflw2000_crops")
    names = assets.fetch("aflw2000_crop_list").read_text().split()[start:start + count]
    return runtime.normalise(np.stack([cv2.imread(str(folder / n)) for n in names]))


def crop_px(params_norm: np.ndarray) -> np.ndarray:
    """[N,2,68] landmarks in 120x120 crop pixels via the numpy runtime."""
    from edge3dfa import runtime

    roi = np.tile(np.array([[0, 0, 120, 120]], np.float32), (len(params_norm), 1))
    return runtime.landmarks(params_norm, roi)[:, :2]


def landmark_error(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-landmark distance [N,68] in crop pixels between two params arrays."""
    return np.linalg.norm(crop_px(ref) - crop_px(cand), axis=1)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def run_cli(*args: object, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``edge3dfa ARGS`` in a fresh interpreter (crashes, signals and exit codes are real there)."""
    return subprocess.run([sys.executable, "-m", "edge3dfa.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
