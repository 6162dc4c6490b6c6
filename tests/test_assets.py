"""Asset registry: resolution order, sha256 checks, one-line errors naming file, place and source."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge3dfa import assets
from edge3dfa.errors import Edge3dfaError


def test_registry_matches_shipped_sha256sums(assets_dir):
    sums = dict(reversed(line.split("  ", 1)) for line in (assets_dir / "SHA256SUMS").read_text().splitlines())
    for a in assets.REGISTRY.values():
        if not a.folder:
            assert sums[a.path] == a.sha256, a.name


def test_fetch_verifies_file_and_folder(assets_dir):
    assert assets.fetch("mb05") == assets_dir / "upstream/3ddfa_v2/weights/mb05_120x120.pth"
    # folder digest as PROVENANCE defines it: sha256 of the folder's SHA256SUMS lines, in path order
    folder = assets.fetch("calibration_crops")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(assets_dir).as_posix()}\n"
             for p in sorted(folder.iterdir())]
    assert hashlib.sha256("".join(lines).encode()).hexdigest() == assets.REGISTRY["calibration_crops"].sha256


def _private_root(tmp_path, monkeypatch, name):
    a = assets.REGISTRY[name]
    dest = tmp_path / a.path
    dest.parent.mkdir(parents=True)
    monkeypatch.setenv("EDGE3DFA_ASSETS", str(tmp_path))
    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE3DFA_DOWNLOAD", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))  # no environment config (make writes one in .venv)
    return a, dest


def test_missing_file_error_names_file_place_and_url(tmp_path, monkeypatch):
    a, _ = _private_root(tmp_path, monkeypatch, "emma")
    with pytest.raises(Edge3dfaError) as e:
        assets.fetch("emma")
    msg = str(e.value)
    assert "\n" not in msg and a.path in msg and str(tmp_path) in msg and a.url in msg


def test_altered_file_is_refused(tmp_path, monkeypatch, assets_dir):
    a, dest = _private_root(tmp_path, monkeypatch, "emma")
    data = bytearray((assets_dir / a.path).read_bytes())
    data[1000] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(Edge3dfaError, match="altered or incomplete"):
        assets.fetch("emma")
    shutil.copy(assets_dir / a.path, dest)  # the intact file is accepted
    assert assets.fetch("emma") == dest


def test_cache_is_second_root(tmp_path, monkeypatch, assets_dir):
    a, _ = _private_root(tmp_path, monkeypatch, "JianzhuGuo")
    cached = tmp_path / "cache" / a.path
    cached.parent.mkdir(parents=True)
    shutil.copy(assets_dir / a.path, cached)
    assert assets.fetch("JianzhuGuo") == cached


def test_unknown_asset():
    with pytest.raises(Edge3dfaError, match="unknown asset"):
        assets.fetch("nope")


def _configure(prefix, folder):
    config = prefix / "etc" / "edge3dfa" / "assets"
    config.parent.mkdir(parents=True)
    config.write_text(f"{folder}\n", encoding="utf-8")


def test_the_environment_config_finds_assets_without_the_variable(tmp_path, assets_dir):
    """A fresh interpreter whose environment names the assets folder (what `make` writes into .venv) finds them
    with EDGE3DFA_ASSETS unset, as a user running `edge3dfa` from an activated .venv does (issue 19)."""
    prefix = tmp_path / "env"
    _configure(prefix, assets_dir)
    code = ("import sys; sys.prefix = sys.argv[1]; from edge3dfa import assets; print(assets.fetch('mb05'))")
    env = {k: v for k, v in os.environ.items() if k != "EDGE3DFA_ASSETS"}
    env["EDGE3DFA_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-c", code, str(prefix)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == assets_dir / assets.REGISTRY["mb05"].path


def test_the_variable_comes_before_the_environment_config(tmp_path, monkeypatch, assets_dir):
    a, dest = _private_root(tmp_path, monkeypatch, "emma")
    shutil.copy(assets_dir / a.path, dest)
    _configure(tmp_path / "env", assets_dir)
    assert assets.roots()[:2] == [tmp_path, assets_dir]
    assert assets.fetch("emma") == dest
    dest.unlink()  # then the configured folder
    assert assets.fetch("emma") == assets_dir / a.path
