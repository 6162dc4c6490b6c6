"""Model zoo: architectures, checkpoints and complexity counts of the 3DDFA_V2 regressors and FaceBoxes.

The registry is plain data and imports without torch; the torch-needing functions are resolved lazily on
first attribute access, so ``import edge3dfa.models`` works on a board that only has the numpy runtime.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from edge3dfa.models.registry import MODELS, ModelSpec, build_model, get_spec, task_of

_LAZY = {
    "Checkpoint": "edge3dfa.models.checkpoint",
    "load_model": "edge3dfa.models.checkpoint",
    "read_state_dict": "edge3dfa.models.checkpoint",
    "infer_arch": "edge3dfa.models.checkpoint",
    "randomize_": "edge3dfa.models.checkpoint",
    "count_params": "edge3dfa.models.complexity",
    "count_macs": "edge3dfa.models.complexity",
}

__all__ = ["MODELS", "ModelSpec", "build_model", "get_spec", "task_of", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
