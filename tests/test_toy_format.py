"""A format edge3dfa has never heard of, added as new files plus entry-point lines (issue 15 "done when").

``tests/toyformat`` is a tiny distribution: the ``edge3dfa_toy`` package (a ``Format`` writing the checkpoint's
weights as an .npz, and the ``Target`` that runs them) and its ``.dist-info/entry_points.txt`` registering both.
Nothing in edge3dfa names it: the format exists exactly while that folder is on the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

TOY = Path(__file__).resolve().parent / "toyformat"
TOY_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(TOY), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture
def toy_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy distribution on sys.path for this test only (restored after it: other tests see no toy)."""
    monkeypatch.syspath_prepend(str(TOY))


def test_without_its_entry_points_there_is_no_toy():
    from edge3dfa.converters import formats
    from edge3dfa.errors import Edge3dfaError
    from edge3dfa.target import target_suffixes

    assert "toy" not in formats() and ".toy" not in target_suffixes()
    with pytest.raises(Edge3dfaError, match="unknown format 'toy'"):
        from edge3dfa.converters import get_format

        get_format("toy")


def test_the_toy_is_found_through_its_entry_points(toy_installed):
    from edge3dfa.converters import formats, get_format, plan
    from edge3dfa.errors import Edge3dfaError
    from edge3dfa.target import runtime_class

    assert "toy" in formats()
    fmt = get_format("toy")
    assert type(fmt).__module__ == "edge3dfa_toy" and fmt.suffix == ".toy"
    assert runtime_class("mb05_fp32.toy").__module__ == "edge3dfa_toy"
    # the plan parses the toy's own typed options and applies its own checks, like any format's
    assert plan("mb05", "toy", "fp16", {"compress": "yes"}).options["toy"].compress is True
    with pytest.raises(Edge3dfaError, match="unknown toy option"):
        plan("mb05", "toy", "fp32", {"opset": "18"})
    with pytest.raises(Edge3dfaError, match="toy does not offer precision int8"):
        plan("mb05", "toy", "int8")
    with pytest.raises(Edge3dfaError, match="landmark regressors only"):
        plan("faceboxes", "toy", "fp32")


@pytest.mark.slow
def test_convert_and_validate_a_toy_artifact_from_the_command_line(tmp_path):
    """`edge3dfa convert --to toy` writes artifact + manifest; `edge3dfa validate` opens, scores and gates them."""
    listed = run_cli("convert", "--to", "toy", "--list-options", env=TOY_ENV)
    assert listed.returncode == 0 and "toy.compress=false" in listed.stdout, listed.stderr
    done = run_cli("convert", "--model", "mb05", "--to", "toy", "--precision", "fp32,fp16", "--option",
                   "compress=true", "--out", tmp_path, env=TOY_ENV)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "mb05" / "toy"
    assert sorted(p.name for p in folder.iterdir()) == ["mb05_fp16.json", "mb05_fp16.toy", "mb05_fp32.json",
                                                        "mb05_fp32.toy"]
    manifest = json.loads((folder / "mb05_fp32.json").read_text())
    assert (manifest["format"], manifest["options"]) == ("toy", {"compress": True})
    # fp32: the same weights in the same network as the PyTorch reference; fp16 weights really are rounded
    assert manifest["parity"]["aflw2000"]["param_max_abs"] == 0
    assert json.loads((folder / "mb05_fp16.json").read_text())["parity"]["aflw2000"]["param_max_abs"] > 0

    checked = run_cli("validate", tmp_path / "mb05", "--samples", "40", "--latency-runs", "0", env=TOY_ENV)
    assert checked.returncode == 0, checked.stderr  # PASSED under the default gates (fp16 gated as lossless)
    report = json.loads((tmp_path / "mb05" / "report.json").read_text())
    rows = {(r["format"], r["precision"]): r for r in report["targets"]}
    assert set(rows) == {("torch", "fp32"), ("toy", "fp32"), ("toy", "fp16")}
    assert {rows["toy", p]["runtime"] for p in ("fp32", "fp16")} == {"toy-torch"}
    assert rows["toy", "fp32"]["nme"] == rows["torch", "fp32"]["nme"]
    assert "toy" in (tmp_path / "mb05" / "report.md").read_text()
    # the toy exists only on that path: without it, validate cannot open its artifacts
    alone = run_cli("validate", tmp_path / "mb05", "--samples", "40", "--latency-runs", "0")
    assert alone.returncode == 2 and "no runtime for '.toy'" in alone.stderr
