"""Manifest round trip and the all-or-nothing publish of artifact + manifest."""

import json
import os

import pytest

from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import atomic_path
from edge3dfa.manifest import Manifest, manifest_path, publish


def _manifest():
    return Manifest(artifact="", format="onnx", precision="fp32", model="mb05", arch="mobilenet_v1",
                    source={"path": "x.pth", "sha256": "0" * 64})


def test_publish_and_read_back(tmp_path):
    tmp = tmp_path / "work" / "m.onnx"
    tmp.parent.mkdir()
    tmp.write_bytes(b"model-bytes")
    dest = publish(tmp, tmp_path / "out" / "mb05_fp32.onnx", _manifest())
    assert dest.read_bytes() == b"model-bytes" and not tmp.exists()
    mpath = manifest_path(dest)
    assert mpath.name == "mb05_fp32.json"
    m = Manifest.read(mpath)
    import hashlib

    assert m.artifact_sha256 == hashlib.sha256(b"model-bytes").hexdigest() and m.size_bytes == 11
    assert m.check_artifact(mpath) == dest
    dest.write_bytes(b"tampered")
    with pytest.raises(Edge3dfaError, match="changed since conversion"):
        m.check_artifact(mpath)


def test_folder_artifact_manifest_name(tmp_path):
    assert manifest_path(tmp_path / "mb05_fp16.mlpackage").name == "mb05_fp16.json"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Edge3dfaError, match="cannot write"):
        with atomic_path(blocker / "sub" / "a.json"):
            pass


def test_read_rejects_foreign_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(Edge3dfaError, match="not an edge3dfa manifest"):
        Manifest.read(p)
    p.write_text("{broken")
    with pytest.raises(Edge3dfaError, match="not valid JSON"):
        Manifest.read(p)
