"""One manifest schema for every artifact: what it is, where it came from, how close it is to PyTorch.

The manifest sits beside its artifact (``mb05_int8.onnx`` -> ``mb05_int8.json``). ``publish`` moves a
finished artifact and its manifest into place as a pair: a failed conversion leaves the old pair (or neither).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edge3dfa import __version__
from edge3dfa.assets import sha256_file
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import atomic_paths

SCHEMA = "edge3dfa.manifest/1"

#: the input every target accepts through ``predict``; artifacts may store another layout (see ``input``)
CANONICAL_INPUT = {"name": "input", "shape": ["N", 3, 120, 120], "layout": "NCHW", "dtype": "float32",
                   "channel_order": "BGR", "normalisation": "(x - 127.5) / 128", "range": [-0.99609375, 0.99609375]}
CANONICAL_OUTPUT = {"name": "params", "shape": ["N", 62], "dtype": "float32",
                    "layout": "12 pose (3x4 camera, row-major) | 40 shape | 10 expression, normalised: "
                              "params = out * param_std + param_mean"}


@dataclass
class Manifest:
    """Everything a user or a gate needs to trust an artifact; serialised as JSON beside it."""

    artifact: str  # file (or .mlpackage folder) name, relative to the manifest
    format: str  # onnx | tflite | coreml | torch
    precision: str  # fp32 | fp16 | int8 | dyn-int8 | w8 | pal6 ...
    model: str  # zoo name or "faceboxes"
    arch: str
    source: dict[str, Any]  # {"path": ..., "sha256": ...} of the checkpoint
    artifact_sha256: str = ""
    size_bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # {"folder", "count", "digest"} for calibrated precisions
    input: dict[str, Any] = field(default_factory=lambda: dict(CANONICAL_INPUT))
    output: dict[str, Any] = field(default_factory=lambda: dict(CANONICAL_OUTPUT))
    parity: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # --nme-budget search: candidates, sensitivity, float layers
    min_runtime: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    edge3dfa_version: str = __version__
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise Edge3dfaError(f"manifest missing: {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Edge3dfaError(f"manifest {path} is not valid JSON ({e})") from e
        if d.get("schema") != SCHEMA:
            raise Edge3dfaError(f"{path} is not an edge3dfa manifest (schema {d.get('schema')!r})")
        return cls.from_dict(d)

    def check_artifact(self, manifest_path: str | os.PathLike) -> Path:
        """The artifact beside the manifest, after checking that its sha256 still matches."""
        art = Path(manifest_path).parent / self.artifact
        if not art.exists():
            raise Edge3dfaError(f"artifact {art} named by {manifest_path} is missing")
        digest = artifact_sha256(art)
        if digest != self.artifact_sha256:
            raise Edge3dfaError(f"{art} changed since conversion: sha256 {digest[:12]}… != manifest "
                                f"{self.artifact_sha256[:12]}…")
        return art


def manifest_path(artifact: str | os.PathLike) -> Path:
    """``out/mb05_int8.onnx`` -> ``out/mb05_int8.json`` (also for ``.mlpackage`` folders)."""
    p = Path(artifact)
    return p.with_name(p.name[: -len(p.suffix)] + ".json") if p.suffix else p.with_name(p.name + ".json")


def artifact_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder artifact (.mlpackage) as the digest of its files' digests."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    from edge3dfa.assets import folder_digest

    return folder_digest(p, p)


def artifact_size(path: str | os.PathLike) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def tool_versions(*packages: str) -> dict[str, str]:
    out = {"edge3dfa": __version__}
    for name in ("numpy", "opencv-python-headless", *packages):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def publish(tmp_artifact: str | os.PathLike, dest: str | os.PathLike, manifest: Manifest) -> Path:
    """Fill the artifact's digest/size/time into ``manifest``, then move artifact and manifest into place as a pair.

    ``tmp_artifact`` (a file or a .mlpackage folder, best on ``dest``'s file system, e.g. in a
    ``fileio.temp_folder`` beside it) is moved. What a reader of ``dest`` and its manifest sees
    (``fileio.replace_together``; the artifact is renamed first, then the manifest):

    * when this returns, the new pair; when it raises (disk full, permission denied, read-only folder, a folder
      in the way), the old pair, or none where there was none: never an artifact without its manifest, no temp
      file left, and an Edge3dfaError naming the destination;
    * while it runs, and after a SIGKILL or power cut in the microseconds between the two renames (until the next
      ``convert`` into the folder completes the pair from its journal), the new artifact beside the old manifest,
      or for a .mlpackage no artifact at all for a moment: a reader that checks the sha256
      (``Manifest.check_artifact``) gets a clear mismatch or "missing" error, never results from a mismatched pair.
      SIGINT and SIGTERM wait until the pair is in place.
    """
    tmp_artifact, dest = Path(tmp_artifact), Path(dest)
    manifest.artifact = dest.name
    manifest.artifact_sha256 = artifact_sha256(tmp_artifact)
    manifest.size_bytes = artifact_size(tmp_artifact)
    manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    mpath = manifest_path(dest)
    with atomic_paths(dest, mpath) as (new_artifact, new_manifest):
        shutil.move(tmp_artifact, new_artifact)
        try:
            new_manifest.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        except OSError as e:  # a failed write names no file: say which
            raise Edge3dfaError(f"cannot write {mpath}: {e.strerror or e}") from e
    return dest
