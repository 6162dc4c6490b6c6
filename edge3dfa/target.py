"""The one inference interface every runtime answers, and ``open_target`` which picks the runtime.

A target takes float32 [N,3,120,120] crops (BGR, (x-127.5)/128, upstream's layout) and returns float32
[N,62] normalised params, whatever the runtime (PyTorch, onnxruntime, LiteRT, CoreML) and whatever layout
or dtype the artifact wants inside: NHWC transposes and int8 scaling are the target's job, not the caller's.

Runtimes plug in through the ``edge3dfa.targets`` entry-point group (name = file suffix, e.g. ``.onnx``),
so this core module never imports them: a Pi install without torch still opens a .tflite.

``open_target`` checks a converted artifact against the manifest beside it before returning it: the manifest
names this file, its format is this runtime's, its precision is one the format offers and the file holds
(float vs quantized, as far as the file tells cheaply), its sha256 matches and the input the runtime sees is
the one the manifest describes. A mismatch is an Edge3dfaError naming the file and the field (exit 2) unless
the caller passes ``verify=False``. An artifact without a manifest (a third-party .onnx) still opens, with
``target.manifest`` None: its provenance is unverified, which the command line says once. Inputs and outputs
are checked on every call: NaN or Inf in the input is bad input, NaN or Inf from a runtime an Edge3dfaError
naming the target, never a number passed on.
"""

from __future__ import annotations

import numbers
import os
import re
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import Manifest, manifest_path

N_PARAMS = 62
#: what a manifest's precision says the file computes with (see ``Target.stored_precision``)
FLOAT_PRECISIONS = {"fp32": ("float32", "float"), "fp16": ("float16", "float")}
CHECKPOINT_SUFFIXES = (".pth", ".pt")


class Target(ABC):
    """Base of every runtime: validates input once, so each runtime only implements ``_run``."""

    #: short runtime name for reports, e.g. "torch", "onnxruntime"
    runtime: str = "?"
    #: the manifest ``format`` of this runtime's artifacts, and the precisions such an artifact can have
    format: str = "?"
    precisions: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike | None, threads: int | None = None):
        self.path = Path(path) if path is not None else None
        self.threads = check_threads(threads)
        #: expected shape of one sample; None entries accept any size (the detector takes any H, W)
        self.input_shape: tuple[int | None, ...] = (3, 120, 120)
        #: the verified manifest beside the artifact (set by ``open_target``); None: none, or not checked
        self.manifest: Manifest | None = None
        #: the bundle contract (``edge3dfa.bundle``) when the artifact is a phone bundle (uint8 image in, named
        #: outputs), read from the file by the runtime or from the manifest; None: a params (or detector) artifact
        self.bundle: dict[str, Any] | None = None

    def input_contract(self) -> dict[str, Any]:
        """The input as the artifact stores it: shape in its own layout (None = any size), layout, dtype, kind."""
        return {"shape": [None, *self.input_shape], "layout": "NCHW", "dtype": "float32", "kind": "tensor"}

    def stored_precision(self) -> str | None:
        """What the artifact computes with, as far as its file tells cheaply: "float32", "float16", "float"
        (either), "quantized" (integer weights or activations), or None when the runtime cannot tell."""
        return None

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.path.name if self.path else '?'}"

    @abstractmethod
    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """Raw outputs for a validated float32 NCHW batch; for a bundle, for the uint8 image of its contract
        (``bundle.to_image_uint8``: NHWC, or NCHW where the contract's layout is "image"), outputs in the
        contract's order (``bundle.OUTPUTS`` or ``bundle.DETECTOR_OUTPUTS``)."""

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """All raw outputs (e.g. FaceBoxes' loc and conf) for a float32 NCHW batch."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise Edge3dfaError(f"{self.name}: input must be float32, got {x.dtype}")
        if x.ndim != 4 or any(w is not None and w != g for w, g in zip(self.input_shape, x.shape[1:])):
            want = "[N," + ",".join("?" if w is None else str(w) for w in self.input_shape) + "]"
            raise Edge3dfaError(f"{self.name}: input must be {want}, got {list(x.shape)}")
        if len(x) == 0:
            raise Edge3dfaError(f"{self.name}: empty batch")
        bad = ~np.isfinite(x).all(axis=(1, 2, 3))
        if bad.any():  # checked first: NaN in, NaN out would otherwise be blamed on the artifact
            raise Edge3dfaError(f"{self.name}: the input holds NaN/Inf in {int(bad.sum())} of {len(x)} samples "
                                "(bad input, not a fault of the model)")
        outs = self._run(self._bundle_input(x) if self.bundle else np.ascontiguousarray(x))
        self._check_finite(outs, len(x))
        return outs

    def _bundle_input(self, x: np.ndarray) -> np.ndarray:
        """The canonical float input as the uint8 image this bundle's contract takes (exactly, or an error)."""
        from edge3dfa import bundle

        return bundle.image_for(self.bundle, x)

    def predict_bundle(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [N,3,120,120] crops -> a regressor bundle's outputs by name (``bundle.OUTPUTS``), checked."""
        if not self.bundle or self.bundle.get("kind") != "regressor":
            raise Edge3dfaError(f"{self.name} is not a landmark bundle (it outputs "
                                f"{'detections' if self.bundle else 'params'}); convert with --bundle")
        return self._named(self.run(x), len(x))

    def predict_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """A regressor bundle on its own input, as an app gives it: the uint8 image of its contract (shape and
        channel order as ``self.bundle["input"]`` says) -> outputs by name; what ``predict_bundle`` does after
        converting the canonical float input (``bundle.to_image_uint8``), and what latency of a bundle times."""
        if not self.bundle or self.bundle.get("kind") != "regressor":
            raise Edge3dfaError(f"{self.name} is not a landmark bundle; convert with --bundle")
        u = np.asarray(image)
        want = [120, 120, 3] if self.bundle["input"].get("layout", "NHWC") == "NHWC" else [3, 120, 120]
        if u.dtype != np.uint8 or u.ndim != 4 or list(u.shape[1:]) != want or len(u) == 0:
            raise Edge3dfaError(f"{self.name}: takes uint8 [N,{','.join(map(str, want))}], got {u.dtype} "
                                f"{list(u.shape)}")
        outs = self._run(np.ascontiguousarray(u))
        self._check_finite(outs, len(u))
        return self._named(outs, len(u))

    def _named(self, outs: list[np.ndarray], n: int) -> dict[str, np.ndarray]:
        """A regressor bundle's raw outputs by name, each checked against the contract's shape."""
        from edge3dfa import bundle

        if len(outs) != len(bundle.OUTPUTS):
            raise Edge3dfaError(f"{self.name}: returned {len(outs)} outputs, a bundle returns "
                                f"{', '.join(bundle.OUTPUTS)}")
        got = {}
        for key, value, shape in zip(bundle.OUTPUTS, outs, ((bundle.N_LANDMARKS, 3), (3,), (N_PARAMS,))):
            a = np.asarray(value, np.float32)
            # the trailing dims too: landmarks as [N,3,68] (the runtime's layout) have the right size, and a
            # reshape would scramble them without a word
            if a.size != n * int(np.prod(shape)) or a.shape[a.ndim - len(shape):] != shape:
                raise Edge3dfaError(f"{self.name}: output {key} has shape {list(a.shape)}, the contract says "
                                    f"[{n},{','.join(map(str, shape))}]")
            got[key] = a.reshape(n, *shape)
        return got

    def _check_finite(self, outs: list[np.ndarray], n: int) -> None:
        """NaN/Inf in any float output is a broken artifact (or a runtime fault), never a result."""
        bad = np.zeros(n, bool)
        for out in outs:
            a = np.asarray(out)
            if a.dtype.kind != "f":
                continue
            per_sample = a.ndim >= 1 and len(a) == n
            finite = np.isfinite(a).all(axis=tuple(range(1, a.ndim))) if per_sample else np.isfinite(a).all()
            bad |= ~finite
        if bad.any():
            raise Edge3dfaError(f"{self.name}: produced NaN/Inf for {int(bad.sum())} of {n} samples; the artifact "
                                "is corrupt or numerically broken (re-convert it)")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 [N,3,120,120] crops -> float32 [N,62] normalised params (a bundle's params normalised back)."""
        if self.bundle and self.bundle.get("kind") == "regressor":
            from edge3dfa import bundle

            return bundle.normalised_params(self.predict_bundle(x)["params"])
        raw = self.run(x)[0]
        with np.errstate(over="ignore"):  # a wider float output may overflow float32: reported just below
            out = np.asarray(raw, dtype=np.float32).reshape(len(x), -1)
        self._check_finite([out], len(x))
        if out.shape[1] != N_PARAMS:
            raise Edge3dfaError(f"{self.name}: model outputs {out.shape[1]} values, not {N_PARAMS} params")
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} threads={self.threads}>"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else every CPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads: object, what: str = "threads") -> int | None:
    """``threads`` if it is None (the runtime's default) or a whole number from 1 to ``usable_cpus()``; an
    Edge3dfaError naming ``what`` (``threads``, ``--threads``...) otherwise.

    One check for every runtime, because each failed differently: onnxruntime took 0 and -1 as "its default" and
    raised TypeError on 2**40, torch raised on 0 and segfaulted on 100000 (OpenMP could not create the threads).
    More threads than CPUs only make the runtime's threads compete for them, so the CPU count is the limit."""
    limit = usable_cpus()
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= limit:
        raise Edge3dfaError(f"{what} must be a whole number from 1 to {limit} (the CPUs this process may use), "
                            f"got {threads!r}")
    return int(threads)


def target_suffixes() -> dict[str, object]:
    """Installed runtimes by artifact suffix (entry points of group ``edge3dfa.targets``)."""
    return {ep.name: ep for ep in entry_points(group="edge3dfa.targets")}


def open_target(path_or_name: str | os.PathLike, threads: int | None = None, *, verify: bool = True,
                **options) -> Target:
    """Open an artifact with the runtime its suffix names; a zoo name (``mb05``) opens the PyTorch reference.

    A converted artifact is checked against the manifest beside it (see the module docstring) unless
    ``verify=False``; ``target.manifest`` is then the manifest, or None when there is none (or when not verified).
    """
    p = Path(path_or_name)
    if p.suffix and not p.exists():
        raise Edge3dfaError(f"artifact not found: {p}")
    cls = runtime_class(p)
    manifest = check_manifest(p, cls) if verify and not is_checkpoint(p) else None
    target = cls(path_or_name, threads=threads, **options)
    if manifest is not None:
        check_contract(target, manifest, manifest_path(p))
        target.manifest = manifest
        if target.bundle is None and manifest.bundle:
            target.bundle = manifest.bundle
    if target.bundle is not None:
        from edge3dfa import bundle

        bundle.check(target.bundle, str(p))
    return target


def is_checkpoint(path_or_name: str | os.PathLike) -> bool:
    """A PyTorch checkpoint or zoo name (the reference, opened by torch: no manifest), not a converted artifact."""
    p = Path(path_or_name)
    return not p.suffix or p.suffix.lower() in CHECKPOINT_SUFFIXES


def runtime_class(path_or_name: str | os.PathLike) -> type[Target]:
    """The installed Target class for an artifact, by its suffix (loading the class imports no framework)."""
    p = Path(path_or_name)
    suffix = ".pth" if is_checkpoint(p) else p.suffix.lower()
    eps = target_suffixes()
    if suffix not in eps:
        known = ", ".join(sorted(eps)) or "none (is edge3dfa installed?)"
        raise Edge3dfaError(f"no runtime for {suffix!r} files ({p.name}); installed runtimes take: {known}")
    try:
        return eps[suffix].load()
    except ImportError as e:
        raise Edge3dfaError(f"the runtime for {suffix} files is not installed ({e.name or e}); "
                            f"install the matching extra, e.g. pip install 'edge3dfa[{_extra(e.name)}]'") from e


def check_manifest(path: str | os.PathLike, cls: type[Target] | None = None) -> Manifest | None:
    """The manifest beside artifact ``path`` once it is checked to describe this file; None when there is none.

    Checks what needs no runtime: the manifest is valid, names this file, has the runtime's format and a
    precision that format offers, and the file's sha256 is the manifest's (hashed once per process while the
    file is unchanged).
    """
    p = Path(path)
    mpath = manifest_path(p)
    if not mpath.exists():
        return None
    m = Manifest.read(mpath)
    cls = cls or runtime_class(p)
    where = f"{p} does not match its manifest {mpath}"
    if m.artifact != p.name:
        raise Edge3dfaError(f"{where}: field 'artifact' names {m.artifact!r} (were files renamed or swapped?)")
    if m.format != cls.format:
        raise Edge3dfaError(f"{where}: field 'format' is {m.format!r}, but {p.suffix} files are {cls.format}")
    if m.precision not in cls.precisions:
        raise Edge3dfaError(f"{where}: field 'precision' is {m.precision!r}, which {cls.format} does not offer "
                            f"({', '.join(cls.precisions)})")
    m.check_artifact(mpath)
    return m


def verify_artifact(path: str | os.PathLike) -> Manifest:
    """Everything ``open_target`` checks, for an artifact that must have a manifest (``validate``).

    Mismatches raise. An artifact this machine cannot open (its runtime is not installed, or the file does not
    load) is checked as far as its manifest and sha256 go; opening it again reports why it cannot be used.
    """
    p = Path(path)
    m = check_manifest(p)
    if m is None:
        raise Edge3dfaError(f"{p} has no manifest ({manifest_path(p).name}); re-run edge3dfa convert")
    try:
        target = runtime_class(p)(p, threads=1)
    except Edge3dfaError:
        return m
    check_contract(target, m, manifest_path(p))
    return m


def check_contract(target: Target, m: Manifest, mpath: str | os.PathLike) -> None:
    """What only the opened artifact tells: its precision (float or quantized) and its input, vs manifest ``m``."""
    where = f"{target.path} does not match its manifest {mpath}"
    stored = target.stored_precision()
    expected = FLOAT_PRECISIONS.get(m.precision, ("quantized",))
    if stored is not None and stored not in expected:
        holds = "integer-quantized weights or ops" if stored == "quantized" else f"{stored} weights, not quantized"
        raise Edge3dfaError(f"{where}: field 'precision' is {m.precision!r}, but the file holds {holds}")
    have, want = target.input_contract(), m.input
    shape = want.get("shape")
    got = have.get("shape")
    if isinstance(shape, list) and got is not None and (len(shape) != len(got) or any(
            isinstance(w, int) and g is not None and w != g for w, g in zip(shape, got))):
        shown = "[" + ", ".join("?" if g is None else str(g) for g in got) + "]"
        raise Edge3dfaError(f"{where}: field 'input.shape' is {shape}, but the artifact takes {shown}")
    for key in ("layout", "dtype", "kind"):
        if key in want and have.get(key) is not None and want[key] != have[key]:
            raise Edge3dfaError(f"{where}: field 'input.{key}' is {want[key]!r}, but the artifact's input is "
                                f"{have[key]!r}")
    if target.bundle is not None and target.bundle != m.bundle:
        raise Edge3dfaError(f"{where}: field 'bundle' is not the contract stored in the file" if m.bundle else
                            f"{where}: the file is a bundle, but the manifest has no 'bundle' field")
    if target.bundle is None and m.bundle:  # the contract will come from the manifest: the file must take its input
        want_dtype = (m.bundle.get("input") or {}).get("dtype") if isinstance(m.bundle, dict) else None
        if have.get("dtype") is not None and want_dtype != have["dtype"]:
            raise Edge3dfaError(f"{where}: field 'bundle' describes a {want_dtype} image input, but the artifact "
                                f"takes {have['dtype']}: not a bundle")


def extras() -> dict[str, list[str]]:
    """edge3dfa's pip extras and the distributions each installs (normalised names), from the installed metadata:
    which runtime needs what is declared once, in pyproject.toml, never by suffix or format name here."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("edge3dfa") or []
    except PackageNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*).*extra\s*==\s*[\"']([^\"']+)[\"']", req)
        if m:
            out.setdefault(m.group(2), []).append(_dist_name(m.group(1)))
    return out


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra(module: str | None) -> str:
    """The smallest extra that installs the missing ``module`` (``ai_edge_litert`` -> pi, ``coremltools`` ->
    coreml); "all" when none does."""
    want = _dist_name((module or "").split(".")[0])
    fits = {name: pkgs for name, pkgs in extras().items() if want in pkgs}
    return min(fits, key=lambda name: len(fits[name])) if fits else "all"
