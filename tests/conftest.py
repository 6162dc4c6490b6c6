"""Real assets through EDGE3DFA_ASSETS (default: ../shared/assets beside the repo)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EDGE3DFA_ASSETS", str(ROOT.parent / "shared" / "assets"))
ASSETS = Path(os.environ["EDGE3DFA_ASSETS"])


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    assert ASSETS.is_dir(), f"EDGE3DFA_ASSETS={ASSETS} is not a folder"
    return ASSETS
