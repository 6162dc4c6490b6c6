"""The one inference interface every runtime answers, and ``open_target`` which picks the runtime.

A target takes float32 [N,3,120,120] crops (BGR, (x-127.5)/128, upstream's layout) and returns float32
[N,62] normalised params, whatever the runtime (PyTorch, onnxruntime, LiteRT, CoreML) and whatever layout
or dtype the artifact wants inside: NHWC transposes and int8 scaling are the target's job, not the caller's.

Runtimes plug in through the ``edge3dfa.targets`` entry-point group (name = file suffix, e.g. ``.onnx``),
so this core module never imports them: a Pi install without torch still opens a .tflite.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from edge3dfa.errors import Edge3dfaError

N_PARAMS = 62


class Target(ABC):
    """Base of every runtime: validates input once, so each runtime only implements ``_run``."""

    #: short runtime name for reports, e.g. "torch", "onnxruntime"
    runtime: str = "?"

    def __init__(self, path: str | os.PathLike | None, threads: int | None = None):
        self.path = Path(path) if path is not None else None
        self.threads = threads
        #: expected shape of one sample; None entries accept any size (the detector takes any H, W)
        self.input_shape: tuple[int | None, ...] = (3, 120, 120)

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.path.name if self.path else '?'}"

    @abstractmethod
    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """Raw outputs for a validated float32 NCHW batch."""

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
        return self._run(np.ascontiguousarray(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 [N,3,120,120] crops -> float32 [N,62] normalised params."""
        out = np.asarray(self.run(x)[0], dtype=np.float32).reshape(len(x), -1)
        if out.shape[1] != N_PARAMS:
            raise Edge3dfaError(f"{self.name}: model outputs {out.shape[1]} values, not {N_PARAMS} params")
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} threads={self.threads}>"


def target_suffixes() -> dict[str, object]:
    """Installed runtimes by artifact suffix (entry points of group ``edge3dfa.targets``)."""
    return {ep.name: ep for ep in entry_points(group="edge3dfa.targets")}


def open_target(path_or_name: str | os.PathLike, threads: int | None = None, **options) -> Target:
    """Open an artifact with the runtime its suffix names; a zoo name (``mb05``) opens the PyTorch reference."""
    p = Path(path_or_name)
    suffix = p.suffix.lower() if p.suffix else ".pth"
    if not p.suffix and not p.exists():
        suffix = ".pth"  # a zoo name
    elif not p.exists():
        raise Edge3dfaError(f"artifact not found: {p}")
    eps = target_suffixes()
    if suffix == ".pt":
        suffix = ".pth"
    if suffix not in eps:
        known = ", ".join(sorted(eps)) or "none (is edge3dfa installed?)"
        raise Edge3dfaError(f"no runtime for {suffix!r} files ({p.name}); installed runtimes take: {known}")
    try:
        cls = eps[suffix].load()
    except ImportError as e:
        raise Edge3dfaError(f"the runtime for {suffix} files is not installed ({e.name or e}); "
                            f"install the matching extra, e.g. pip install 'edge3dfa[{_extra(suffix)}]'") from e
    return cls(path_or_name, threads=threads, **options)


def _extra(suffix: str) -> str:
    return {".pth": "torch", ".onnx": "onnx", ".tflite": "pi", ".mlpackage": "coreml",
            ".pte": "executorch"}.get(suffix, "all")
