"""PyTorch reference target: the checkpoint itself, the yardstick every other runtime is compared with."""

from __future__ import annotations

import os

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.target import Target


class TorchTarget(Target):
    """A zoo name or a 3DDFA_V2 / FaceBoxes checkpoint (arch given, as a zoo or arch name, or read from its keys)."""

    runtime = "torch"
    format = "torch"
    precisions = ("fp32",)

    def __init__(self, path: str | os.PathLike | None = None, threads: int | None = None,
                 arch: str | None = None, model=None):  # noqa: ANN001
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise Edge3dfaError("the PyTorch reference needs torch: pip install 'edge3dfa[torch]'") from e
        super().__init__(path, threads)
        from edge3dfa.models import MODELS, task_of

        if model is None:
            from edge3dfa.models.checkpoint import Checkpoint

            zoo = arch if arch in MODELS else "mb05"  # no path: the zoo's weights
            checkpoint = Checkpoint.open(path if path is not None else zoo, None if path is None else arch)
            model, arch = checkpoint.load(), checkpoint.arch
        self.arch = MODELS[arch].arch if arch in MODELS else arch
        self.model = model.eval()
        if task_of(self.arch or "") == "detector":
            self.input_shape = (3, None, None)  # the detector takes any image size

    @property
    def name(self) -> str:
        return f"torch:{self.path.name if self.path else type(self.model).__name__}"

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x))
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
