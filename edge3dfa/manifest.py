"""One manifest schema for every artifact: what it is, where it came from, how close it is to PyTorch.

The manifest sits beside its artifact (``mb05_int8.onnx`` -> ``mb05_int8.json``). ``publish`` moves a
finished artifact and its manifest into place as a pair: a failed conversion leaves the old pair (or neither).

``Manifest.read`` trusts nothing: a manifest is a file a person can edit, copy or swap, and everything that
opens an artifact (``open_target``, ``validate``) acts on what it says. It checks the schema version, that
every required key is there with its JSON type, and that ``artifact`` is a plain name beside the manifest
(no path: a manifest must not point a reader at another folder). Keys this version does not know are kept
(``Manifest.extra``) and otherwise ignored: within one schema version keys are only ever added, so a board
running an older edge3dfa still reads what a newer converter wrote; a change an older reader would
misunderstand bumps the version, which older readers refuse by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edge3dfa import __version__
from edge3dfa.assets import sha256_file
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import atomic_paths

SCHEMA_NAME = "edge3dfa.manifest"
#: schema versions this edge3dfa reads; it writes the last one
SCHEMA_VERSIONS = (1,)
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSIONS[-1]}"
#: keys a manifest cannot do without: identity, provenance, integrity and the I/O contract
REQUIRED = ("schema", "artifact", "format", "precision", "model", "arch", "source", "artifact_sha256", "input",
            "output")

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
    bundle: dict[str, Any] | None = None  # a phone bundle's contract (edge3dfa.bundle); None: a params artifact
    min_runtime: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    edge3dfa_version: str = __version__
    schema: str = SCHEMA
    #: keys of a newer writer that this version does not know; written back as they were
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """A manifest from already validated keys (see ``read``); unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        """The manifest at ``path``, validated; an Edge3dfaError naming the file and the field otherwise.

        Only a regular file is read: a named pipe or device in a manifest's place would block or never end."""
        path = Path(path)
        if path.exists() and not path.is_file():
            raise Edge3dfaError(f"manifest {path} is not a regular file")
        try:
            d = json.loads(path.read_bytes())
        except FileNotFoundError as e:
            raise Edge3dfaError(f"manifest missing: {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Edge3dfaError(f"manifest {path} is not valid JSON ({e})") from e
        except RecursionError:
            raise Edge3dfaError(f"manifest {path} is not a manifest: JSON nested too deeply to read") from None
        validate(d, path)
        return cls.from_dict(d)

    def check_artifact(self, manifest_path: str | os.PathLike) -> Path:
        """The artifact beside the manifest, after checking that its sha256 still matches."""
        art = Path(manifest_path).parent / self.artifact
        if not art.exists():
            raise Edge3dfaError(f"artifact {art} named by {manifest_path} is missing")
        digest = current_sha256(art)
        if digest != self.artifact_sha256:
            raise Edge3dfaError(f"{art} changed since conversion: its sha256 {digest[:12]}… differs from field "
                                f"'artifact_sha256' {self.artifact_sha256[:12]}… of {manifest_path}; re-convert it, "
                                "or pass --no-verify to use it unchecked")
        return art


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (str, int, dict[str, X], list[X], X | None, Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    base = origin or hint
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, base):
        return False
    if base is list and args:
        return all(_matches(v, args[0]) for v in value)
    if base is dict and args:
        return all(_matches(v, args[1]) for v in value.values())
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    base = origin or hint
    text = _JSON_TYPES.get(base, str(hint))
    if base is list and args and args[0] is not Any:
        text += f" of {_describe(args[0]).split(' ', 1)[1]}s"
    if base is dict and args and args[1] is not Any:
        text += f" of {_describe(args[1]).split(' ', 1)[1]}s"
    return text


def is_plain_name(name: str) -> bool:
    """A file or folder name with no folder part on any OS: not absolute, no separator, not ``.``/``..``."""
    return (bool(name) and name not in (".", "..") and "\0" not in name
            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)


def validate(d: Any, path: str | os.PathLike) -> None:
    """Raise an Edge3dfaError naming ``path`` and the field unless ``d`` is a manifest this version reads."""
    where = f"manifest {path}"
    if not isinstance(d, dict):
        raise Edge3dfaError(f"{where} is not an edge3dfa manifest: the file holds {_json_type(d)}, not an object")
    schema = d.get("schema")
    name, _, ver = schema.rpartition("/") if isinstance(schema, str) else ("", "", "")
    if name != SCHEMA_NAME or not ver.isdigit():
        raise Edge3dfaError(f"{where} is not an edge3dfa manifest (field 'schema' is {schema!r}, expected {SCHEMA!r})")
    if int(ver) not in SCHEMA_VERSIONS:
        newer = int(ver) > SCHEMA_VERSIONS[-1]
        raise Edge3dfaError(f"{where}: schema {schema} {'is newer than' if newer else 'is not one of'} what edge3dfa "
                            f"{__version__} reads ({', '.join(f'{SCHEMA_NAME}/{v}' for v in SCHEMA_VERSIONS)})"
                            + ("; upgrade edge3dfa" if newer else ""))
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise Edge3dfaError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    hints = typing.get_type_hints(Manifest)
    for key, value in d.items():
        if key in hints and key != "extra" and not _matches(value, hints[key]):
            raise Edge3dfaError(f"{where}: field {key!r} must be {_describe(hints[key])}, got {_json_type(value)}")
    for key in ("format", "precision", "model", "arch"):
        if not d[key].strip():
            raise Edge3dfaError(f"{where}: field {key!r} is empty")
    if not is_plain_name(d["artifact"]):
        raise Edge3dfaError(f"{where}: field 'artifact' must be a file name beside the manifest (no folder, no "
                            f"'..', not absolute), got {d['artifact']!r}")
    if not _SHA256.fullmatch(d["artifact_sha256"]):
        raise Edge3dfaError(f"{where}: field 'artifact_sha256' must be 64 lowercase hex digits, "
                            f"got {d['artifact_sha256'][:80]!r}")
    if d.get("size_bytes", 0) < 0:
        raise Edge3dfaError(f"{where}: field 'size_bytes' is negative")
    _validate_io(d, where)


def _validate_io(d: dict[str, Any], where: str) -> None:
    """The parts of ``source`` and ``input`` that readers act on: their types, where present."""
    for key in ("path", "sha256"):
        value = d["source"].get(key)
        if value is not None and not isinstance(value, str):
            raise Edge3dfaError(f"{where}: field 'source.{key}' must be a string, got {_json_type(value)}")
    shape = d["input"].get("shape")
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v > 0) for v in shape)):
        raise Edge3dfaError(f"{where}: field 'input.shape' must be a list of positive integers or names, got {shape!r}")
    for key in ("layout", "dtype", "kind"):
        value = d["input"].get(key)
        if value is not None and not isinstance(value, str):
            raise Edge3dfaError(f"{where}: field 'input.{key}' must be a string, got {_json_type(value)}")


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


#: sha256 of artifacts already hashed in this process, by path and the stat of every file
_DIGESTS: dict[tuple[Any, ...], str] = {}


def current_sha256(path: str | os.PathLike) -> str:
    """``artifact_sha256(path)``, hashed once per process while no file of it changes (size, mtime, inode).

    ``validate`` opens each artifact once to score it and once more per latency thread count; the digest is
    taken on the first open, and any write to the file (or a file of an .mlpackage) since then rehashes.
    """
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    key = (str(p), *((str(f), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for f in files
                     for s in [f.stat()]))
    if key not in _DIGESTS:
        _DIGESTS[key] = artifact_sha256(p)
    return _DIGESTS[key]


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
