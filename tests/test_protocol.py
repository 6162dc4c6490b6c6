"""Every registered format keeps the written protocol (``edge3dfa.converters.base``; that each has a runtime for
its suffix is test_faults_artifacts'), and docs/architecture.md names the floors that pyproject's import-linter
contracts enforce and the entry-point groups (the page stays true to the code)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_format_keeps_the_protocol():
    from edge3dfa.converters import formats, get_format
    from edge3dfa.converters.base import Format
    from edge3dfa.options import Options

    names = formats()
    assert names, "no format registered under the edge3dfa.converters entry points"
    for name in names:
        fmt = get_format(name)
        assert isinstance(fmt, Format) and fmt.name == name, name
        assert fmt.suffix.startswith(".") and fmt.extra, name
        assert set(fmt.default_precisions) <= set(fmt.precisions), name
        assert set(fmt.calibrated) <= set(fmt.precisions), name
        assert issubclass(fmt.Options, Options) and fmt.Options is not Options, name
        assert fmt.Options.__dataclass_params__.frozen, name
        # defaults live in the dataclass only: parsing nothing gives them, and every field is listed with help
        assert fmt.Options.parse({}) == fmt.Options(), name
        listed = [row[0] for row in fmt.Options.describe()]
        assert listed == [f.name for f in dataclasses.fields(fmt.Options)], name
        assert all(row[3] for row in fmt.Options.describe()), f"{name}: an option without help"
        # the budget search applies each candidate's overrides with Options.replace: a misspelt key fails here
        known = {f.name for f in dataclasses.fields(fmt.Options)}
        for candidate, overrides in fmt.int8_candidates.items():
            assert set(overrides) <= known, f"{name} candidate {candidate}: {sorted(set(overrides) - known)}"
            fmt.Options().replace(**overrides)  # and every value parses


def _layers() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = [c for c in config["contracts"] if c["type"] == "layers"]
    assert contracts, "no layers contract in pyproject.toml"
    return [m for c in contracts for layer in c["layers"] for m in re.split(r"[|:]", layer)]


def test_the_architecture_page_names_every_floor_and_entry_point_group():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for module in _layers():
        short = module.strip().removeprefix("edge3dfa.")
        assert re.search(rf"\b{re.escape(short)}\b", page), f"docs/architecture.md does not name {module.strip()}"
    tomllib = pytest.importorskip("tomllib")
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group in groups:
        assert f"`{group}`" in page, f"docs/architecture.md does not name the entry-point group {group}"
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
