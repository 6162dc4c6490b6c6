"""CoreML target: a saved ``.mlpackage`` run by CoreML itself on macOS, or by the numpy MIL evaluator elsewhere.

CoreML's ``predict`` exists only on macOS, yet an iOS developer's CI is often Linux; there the evaluator in
:mod:`edge3dfa.targets.mil_eval` executes the very program and weights stored in the package, so parity
figures are computed from what ships. ``runtime`` says which one ran ("coreml" or "mil-numpy").

Both input kinds the converter writes are accepted through the same ``predict``: a float tensor (canonical
crops) or an image input (BGR pixels 0..255, normalisation inside the model), for which the canonical crops
are mapped back to pixels, x * 128 + 127.5 (exact for crops made from uint8 images). A phone bundle (its contract
under ``edge3dfa.bundle`` in the package's user-defined metadata, read into ``self.bundle``) gets the uint8 image of
its contract from ``Target.run``, handed over as an app would: an RGB image, which CoreML (or the evaluator,
``mil_eval.image_planes``) turns into planes in the input's color layout.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.target import Target
from edge3dfa.targets.mil_eval import (
    MILEvaluator,
    blas_threads,
    image_planes,
    import_coremltools,
    quiet_coremltools,
)

BACKENDS = ("auto", "coreml", "mil")
#: MIL op types of compressed programs (linear/blockwise int8 weights, palettes, int8 activations); the program
#: protobuf stores op types and dtypes as plain strings, so a byte search finds them
_QUANTIZED_OPS = (b"quantize", b"constexpr_")
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")


def coreml_runtime_available() -> bool:
    """True on macOS with coremltools' compiled CoreML bridge (what ``MLModel.predict`` needs)."""
    if platform.system() != "Darwin":
        return False
    try:
        import_coremltools()
        from coremltools.models import model as ct_model

        return getattr(ct_model, "_MLModelProxy", None) is not None
    except Edge3dfaError:
        return False


def _input_bounds(feature_type: Any) -> list[tuple[int, int | None]]:
    """(lower, upper) of every input dim from the model description (an image input is [1, 3, H, W])."""
    kind = feature_type.WhichOneof("Type")
    if kind == "imageType":
        t = feature_type.imageType
        return [(1, 1), (3, 3), (t.height, t.height), (t.width, t.width)]
    if kind != "multiArrayType":
        raise Edge3dfaError(f"CoreML input of type {kind} is not supported; expected a tensor or an image")
    t = feature_type.multiArrayType
    if t.shapeRange.sizeRanges:
        return [(r.lowerBound, None if r.upperBound < 0 else r.upperBound) for r in t.shapeRange.sizeRanges]
    return [(int(d), int(d)) for d in t.shape]


def _bundle_contract(spec: Any, label: str) -> dict | None:
    """The bundle contract stored in the package's user-defined metadata (``edge3dfa.bundle``); None: not a bundle."""
    from edge3dfa import bundle

    return bundle.parse_contract(spec.description.metadata.userDefined.get(bundle.METADATA_KEY), label)


class CoreMLTarget(Target):
    """``CoreMLTarget(path, threads=None, backend="auto"|"coreml"|"mil", compute_units="all")``.

    ``threads``: CoreML schedules its own threads; for the evaluator it caps numpy's BLAS threads (default 1:
    its per-op matmuls are small, and on a loaded 2-core machine OpenBLAS' pool ran mb05 9x slower than one
    thread, 133 vs 15 ms per crop).
    """

    format = "coreml"
    precisions = ("fp32", "fp16", "w8", "pal6", "pal4", "int8")

    def __init__(self, path: str | os.PathLike, threads: int | None = None, backend: str = "auto",
                 compute_units: str = "all"):
        super().__init__(path, threads)
        if backend not in BACKENDS:
            raise Edge3dfaError(f"CoreML backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if compute_units not in COMPUTE_UNITS:
            raise Edge3dfaError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
        p = Path(path)
        if not p.exists():
            raise Edge3dfaError(f"CoreML package not found: {p}")
        if not p.is_dir() or not (p / "Manifest.json").is_file():
            raise Edge3dfaError(f"{p} is not an .mlpackage (a folder with Manifest.json)")
        if backend == "auto":
            backend = "coreml" if coreml_runtime_available() else "mil"
        elif backend == "coreml" and not coreml_runtime_available():
            raise Edge3dfaError("CoreML predict needs macOS with coremltools' CoreML bridge; use backend='mil' "
                                "(the numpy evaluator) elsewhere")
        self.backend = backend
        self.runtime = "coreml" if backend == "coreml" else "mil-numpy"
        # The evaluator validates the package fully (weights readable, every op known) as it loads.
        self._eval = MILEvaluator.from_package(p) if backend == "mil" else None
        self._model: Any = None
        ct = import_coremltools()
        try:
            with quiet_coremltools():
                spec = ct.models.MLModel(str(p), skip_model_load=True).get_spec()
        except Exception as e:  # noqa: BLE001 - protobuf / package errors of every kind
            raise Edge3dfaError(f"{p}: unreadable CoreML package ({' '.join(str(e).split())[:160]})") from None
        inputs = list(spec.description.input)
        if len(inputs) != 1:
            raise Edge3dfaError(f"{p.name}: expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.image_input = inputs[0].type.WhichOneof("Type") == "imageType"
        array = inputs[0].type.multiArrayType
        self._input_dtype = None if self.image_input else array.ArrayDataType.Name(array.dataType).lower()
        self.output_names = [o.name for o in spec.description.output]
        #: per dim (lower, upper) as CoreML enforces them; upper None = unbounded
        self.bounds = _input_bounds(inputs[0].type)
        shape = tuple(lo if lo == hi else None for lo, hi in self.bounds)
        if len(shape) != 4 or shape[1] != 3:
            raise Edge3dfaError(f"{p.name}: input {self.input_name} has shape {list(shape)}, not [N,3,H,W]")
        self.fixed_batch = shape[0]  # None: any batch; else the program runs that many at a time (the loop below)
        self.input_shape = shape[1:]
        self.bundle = _bundle_contract(spec, p.name)
        self.color_layout = None
        if self.image_input:
            self.color_layout = spec.description.input[0].type.imageType.ColorSpace.Name(
                inputs[0].type.imageType.colorSpace)
        if self.bundle is not None and not self.image_input:
            raise Edge3dfaError(f"{p.name}: a CoreML bundle takes an image input, this one takes a tensor")
        if backend == "coreml":
            units = getattr(ct.ComputeUnit, compute_units.upper())
            with quiet_coremltools():
                self._model = ct.models.MLModel(str(p), compute_units=units)

    def input_contract(self) -> dict:
        if self.bundle is not None:  # the contract's image shape [1, H, W]: one image, channels by color layout
            return {"shape": [self.fixed_batch, *self.input_shape[1:]], "layout": "image", "dtype": "uint8",
                    "kind": "image"}
        return {"shape": [self.fixed_batch, *self.input_shape], "layout": "NCHW",
                "dtype": {"double": "float64"}.get(self._input_dtype, self._input_dtype),
                "kind": "image" if self.image_input else "tensor"}

    def stored_precision(self) -> str:
        """Compressed ops anywhere = quantized; else fp16 casts (what coremltools emits for fp16 compute) = fp16."""
        data = b"".join(f.read_bytes() for f in sorted(Path(self.path).rglob("*.mlmodel")))
        if any(op in data for op in _QUANTIZED_OPS):
            return "quantized"
        return "float16" if b"fp16" in data else "float32"

    def _feed(self, x: np.ndarray) -> np.ndarray:
        if self.bundle is not None:  # already the uint8 image of the contract (Target._bundle_input)
            return x
        return x * np.float32(128.0) + np.float32(127.5) if self.image_input else x

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        for axis, (lo, hi) in enumerate(self.bounds[1:], start=1):  # the batch is split into runs below
            if x.shape[axis] < lo or (hi is not None and x.shape[axis] > hi):
                raise Edge3dfaError(f"{self.name}: input dim {axis} must be in [{lo}, {hi or 'inf'}], "
                                    f"got {list(x.shape)}")
        step = self.fixed_batch or len(x)
        with blas_threads(self.threads or 1) if self._eval is not None else contextlib.nullcontext():
            chunks = [self._run_chunk(self._feed(x[i:i + step])) for i in range(0, len(x), step)]
        return [np.concatenate([c[k] for c in chunks]).astype(np.float32, copy=False)
                for k in range(len(self.output_names))]

    def _run_chunk(self, x: np.ndarray) -> list[np.ndarray]:
        if self.bundle is not None:  # uint8 planes in the contract's channel order -> an RGB image, as an app has
            rgb = self._rgb(x)
            if self._eval is not None:
                out = self._eval({self.input_name: image_planes(rgb, self.color_layout)})
            else:
                from PIL import Image

                out = self._model.predict({self.input_name: Image.fromarray(rgb)})
            return [np.asarray(out[name]) for name in self.output_names]
        if self._eval is not None:
            out = self._eval({self.input_name: x})
        else:
            out = self._model.predict({self.input_name: self._as_image(x) if self.image_input else x})
        return [np.asarray(out[name]) for name in self.output_names]

    def _rgb(self, planes: np.ndarray) -> np.ndarray:
        """A bundle's uint8 planes [1,3,H,W] in its contract's channel order -> the RGB image [H,W,3] an app holds."""
        if len(planes) != 1:
            raise Edge3dfaError("a CoreML bundle takes one image per prediction")
        hwc = planes[0].transpose(1, 2, 0)
        order = self.bundle["input"].get("channel_order", "BGR")
        return np.ascontiguousarray(hwc if order == "RGB" else hwc[..., ::-1])

    @staticmethod
    def _as_image(pixels: np.ndarray) -> Any:
        """BGR planes [1,3,H,W] 0..255 -> the PIL image CoreML's image input takes (PIL is RGB)."""
        from PIL import Image

        if len(pixels) != 1:
            raise Edge3dfaError("an image-input CoreML model takes one image per prediction")
        hwc = np.clip(np.rint(pixels[0]), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(hwc[..., ::-1]))
