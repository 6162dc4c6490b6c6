"""A toy artifact format that edge3dfa knows nothing about: the proof that a new format is new files plus
entry-point lines (``edge3dfa_toy-0.1.dist-info/entry_points.txt`` beside this package), with no change to edge3dfa.

``tests/test_toy_format.py`` puts this folder on the path; ``edge3dfa convert --to toy`` then writes
``NAME_PRECISION.toy`` (an .npz of the checkpoint's weights, float16 for fp16, and the network's arch) with its
manifest, and ``edge3dfa validate`` opens it with ``ToyTarget`` (the weights loaded into the zoo network, run by
PyTorch) and scores it like any other artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa.converters.base import Format
from edge3dfa.errors import Edge3dfaError
from edge3dfa.options import Options, option
from edge3dfa.target import Target

DTYPES = {"fp32": np.float32, "fp16": np.float16}
ARCH, WIDEN = "__arch__", "__widen_factor__"


@dataclass(frozen=True)
class ToyOptions(Options):
    label = "toy option"
    compress: bool = option(False, "write the weights with numpy.savez_compressed")


class ToyFormat(Format):
    name = "toy"
    suffix = ".toy"
    extra = "torch"
    precisions = ("fp32", "fp16")
    default_precisions = ("fp32",)
    calibrated = frozenset()
    Options = ToyOptions

    def check(self, precision: str, detector: bool, options: Options) -> None:
        super().check(precision, detector, options)
        if detector:
            raise Edge3dfaError("toy writes landmark regressors only, not the FaceBoxes detector")

    def write(self, source: Any, dest: Path, precision: str, options: Options, calibration: Any) -> dict[str, Any]:
        weights = {k: v.detach().numpy() for k, v in source.load().state_dict().items()}
        weights = {k: v.astype(DTYPES[precision]) if v.dtype.kind == "f" else v for k, v in weights.items()}
        save = np.savez_compressed if options.compress else np.savez
        with open(dest, "wb") as f:  # a file object: numpy would append .npz to a name
            save(f, **{ARCH: np.array(source.arch), WIDEN: np.array(source.widen_factor)}, **weights)
        return {"options": options.to_dict(), "tools": {"numpy": np.__version__}}


class ToyTarget(Target):
    runtime = "toy-torch"
    format = "toy"
    precisions = ToyFormat.precisions

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import torch

        from edge3dfa.models import build_model

        super().__init__(path, threads)
        with np.load(self.path) as z:
            arrays = {k: z[k] for k in z.files}
        arch, widen = str(arrays.pop(ARCH)), float(arrays.pop(WIDEN))
        self.dtype = next(v.dtype for v in arrays.values() if v.dtype.kind == "f")
        self.model = build_model(arch, widen).eval()
        self.model.load_state_dict({k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                    for k, v in arrays.items()})

    def stored_precision(self) -> str | None:
        return str(self.dtype)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return [self.model(torch.from_numpy(x)).numpy()]
