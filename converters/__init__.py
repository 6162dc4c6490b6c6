"""One call from a checkpoint to deployable artifacts: ``convert("mb05", to="onnx", precision="int8")``.

Each format is a module (``onnx``, ``tflite``, ``coreml``) exposing ``PRECISIONS``, ``SUFFIX`` and
``export(model, dest, precision, *, source, calibration, **options) -> dict`` (manifest fields it fills:
options, input, output, notes, min_runtime, tools), and optionally ``check_options(precision, detector,
options)`` (unknown keys and bad values raise, before any format converts) and ``extra_parity(path, reference,
sets, threads) -> dict`` for figures only that format has. ``convert`` does the rest once for every format: load the
model, calibrate, export into a temp folder beside the destination, open it with its target, measure parity against
PyTorch, write the manifest, and move both into place as a pair (``manifest.publish``: a failure leaves the old pair
or neither). Temp folders that a killed run left in the output folders are removed first (``fileio.remove_stale``).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge3dfa.assets import sha256_file
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import remove_stale, temp_folder, write_errors
from edge3dfa.manifest import Manifest, publish

#: format -> module; modules import their framework lazily, so listing them costs nothing
FORMATS = {"onnx": "edge3dfa.converters.onnx", "tflite": "edge3dfa.converters.tflite",
           "coreml": "edge3dfa.converters.coreml", "executorch": "edge3dfa.converters.executorch"}
CALIBRATED = {"int8", "w8a8"}  # precisions that need real face crops; --nme-budget applies to them
PARITY_COUNT = 64


@dataclass(frozen=True)
class Source:
    """The PyTorch model being converted and where it came from."""

    model: Any  # torch.nn.Module in eval mode
    name: str  # zoo name, checkpoint stem, or "faceboxes"
    arch: str
    widen_factor: float | None
    path: str
    sha256: str

    @property
    def is_detector(self) -> bool:
        return self.arch == "faceboxes"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest


def format_module(fmt: str):  # noqa: ANN201
    """The converter module for ``fmt``; a clear error if it is unknown or its extra is not installed."""
    if fmt not in FORMATS:
        raise Edge3dfaError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[fmt])
    except ImportError as e:
        raise Edge3dfaError(f"the {fmt} converter is not available ({e}); pip install 'edge3dfa[{fmt}]'") from e


def plan_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    """``"onnx,tflite"`` or ``["onnx", "tflite"]`` -> ``["onnx", "tflite"]`` (blanks and repeats dropped); an
    empty list is an error: a plan that would build nothing must not look like success."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    out = list(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    if not out:
        known = ", ".join(FORMATS) if what == "format" else "e.g. fp32, fp16, int8"
        raise Edge3dfaError(f"no {what} given ({known}); nothing to convert")
    return out


def check_budget(nme_budget: float | None, precisions: Sequence[str]) -> None:
    """``--nme-budget``: a finite number >= 0, and int8 among the precisions."""
    if nme_budget is None:
        return
    if isinstance(nme_budget, bool) or not isinstance(nme_budget, (int, float)) or not math.isfinite(nme_budget) \
            or nme_budget < 0:
        raise Edge3dfaError(f"--nme-budget must be a finite number >= 0 (NME points, e.g. 0.05), got {nme_budget}")
    if not CALIBRATED & set(precisions):
        raise Edge3dfaError(f"--nme-budget {nme_budget:g} chooses among int8 artifacts: add int8 (CoreML: w8a8) to "
                            f"the precisions (asked: {', '.join(precisions)})")


def over_budget(artifacts: Sequence[Artifact]) -> list[Artifact]:
    """The artifacts built with ``nme_budget`` whose search did not meet it (``quantization.met`` false)."""
    return [a for a in artifacts if (a.manifest.quantization or {}).get("met") is False]


def _is_calibration_set(calibration: Any) -> bool:
    from edge3dfa.converters.calibration import CalibrationSet

    return isinstance(calibration, CalibrationSet)


def load_source(model: str | os.PathLike = "mb05", arch: str | None = None) -> Source:
    """A zoo name, a checkpoint path (arch given or inferred), or ``faceboxes`` (the detector)."""
    from edge3dfa import assets
    from edge3dfa.models import get_spec, infer_arch, load_model, read_state_dict

    if str(model) == "faceboxes" or arch == "faceboxes":
        from edge3dfa.models.faceboxes import load_faceboxes

        path = assets.fetch("faceboxes") if str(model) == "faceboxes" else Path(model)
        return Source(load_faceboxes(path), "faceboxes", "faceboxes", None, str(path), sha256_file(path))
    p = Path(model)
    if p.exists():
        arch_name, widen = (get_spec(arch).arch, get_spec(arch).widen_factor) if arch else infer_arch(
            read_state_dict(p))
        return Source(load_model(p, arch=arch), p.stem, arch_name, widen, str(p), sha256_file(p))
    spec = get_spec(str(model))
    if spec.checkpoint_asset is None:
        raise Edge3dfaError(f"{spec.name} has no public weights; pass a checkpoint path and --arch {spec.name}")
    path = assets.fetch(spec.checkpoint_asset)
    return Source(load_model(spec.name), spec.name, spec.arch, spec.widen_factor, str(path), sha256_file(path))


def convert(model: str | os.PathLike | Source = "mb05", to: str | Sequence[str] = "onnx",
            precision: str | Sequence[str] = "fp32", out_dir: str | os.PathLike = "out", *,
            arch: str | None = None, calibration: Any = None, calib_count: int = 256,
            parity_count: int = PARITY_COUNT, threads: int | None = None, verbose: bool = True,
            nme_budget: float | None = None, heldout: Any = None, sensitivity: bool = False,
            **options: Any) -> list[Artifact]:
    """Convert ``model`` to every format in ``to`` at every precision; artifacts go to OUT/NAME/FORMAT/.

    ``calibration`` is a CalibrationSet, a folder of crops or photos, or None (the default disjoint set);
    it is only loaded when a calibrated precision is asked for. ``options`` go to the format's export.
    ``nme_budget`` (e.g. 0.05): int8 (CoreML: w8a8) becomes the fastest int8 / mixed-precision artifact whose
    held-out NME is within that much of fp32 (``converters.mixed_precision``), judged on ``heldout`` (default: the last
    256 calibration crops, ``validation.datasets.aflw.load_heldout``); ``sensitivity`` adds the per-layer
    ranking to the record even when no layer has to stay float.
    """
    from edge3dfa.converters.calibration import CalibrationSet, load_calibration, load_eval_crops
    from edge3dfa.converters.parity import parity
    from edge3dfa.target import check_threads, open_target
    from edge3dfa.targets.torch import TorchTarget

    formats, precisions = plan_list(to, "format"), plan_list(precision, "precision")
    modules = {fmt: format_module(fmt) for fmt in formats}
    for fmt, mod in modules.items():
        bad = [p for p in precisions if p not in mod.PRECISIONS]
        if bad:
            raise Edge3dfaError(f"{fmt} does not offer precision {', '.join(bad)}; "
                                f"it offers {', '.join(mod.PRECISIONS)}")
    check_budget(nme_budget, precisions)
    check_threads(threads, "--threads")
    if any(p in CALIBRATED for p in precisions) and not _is_calibration_set(calibration):
        from edge3dfa.converters.calibration import calibration_files

        calibration_files(calibration, calib_count)  # a bad folder or count fails now, not after loading the model
    src = model if isinstance(model, Source) else load_source(model, arch)
    for mod in modules.values():  # a typo in an option fails here, before anything is converted or written
        for prec in precisions:
            if hasattr(mod, "check_options"):
                mod.check_options(prec, src.is_detector, options)
    out = Path(out_dir) / src.name
    calib = calibration
    if any(p in CALIBRATED for p in precisions) and not isinstance(calib, CalibrationSet):
        calib = load_calibration(calib, count=calib_count)
    reference = TorchTarget(src.path, threads=threads, arch="faceboxes" if src.is_detector else None, model=src.model)
    sets = {}
    if not src.is_detector:
        # "calibration": the LAST crops of the default calibration folder, which int8 calibration (the first
        # calib_count in sorted order) does not see unless it asks for nearly all 512: figures stay held out
        sets = {"aflw2000": load_eval_crops(parity_count),
                "calibration": load_calibration(None, count=512, check_disjoint=False).data[-parity_count:]}
    _prepare(out, verbose)
    results = []
    for fmt, mod in modules.items():
        for prec in precisions:
            dest = out / fmt / f"{src.name}_{prec}{mod.SUFFIX}"
            if verbose:
                print(f"converting {src.name} -> {fmt} {prec} ...", file=sys.stderr, flush=True)
            _prepare(dest.parent, verbose)
            with temp_folder(dest.parent, "convert", dest=dest) as work, write_errors([dest], work):
                tmp = work / dest.name
                if nme_budget is not None and prec in CALIBRATED and not src.is_detector:
                    from edge3dfa.converters.mixed_precision import Budget, export_within_budget

                    info = export_within_budget(mod, src.model, tmp, source=src, calibration=calib,
                                                reference=reference, budget=Budget(nme_budget), heldout=heldout,
                                                sensitivity=sensitivity,
                                                log=None if verbose else lambda s: None, **options)
                else:
                    info = mod.export(src.model, tmp, prec, source=src,
                                      calibration=calib if prec in CALIBRATED else None, **options)
                manifest = Manifest(artifact=dest.name, format=fmt, precision=prec, model=src.name, arch=src.arch,
                                    source={"path": src.path, "sha256": src.sha256, "widen_factor": src.widen_factor})
                for key, value in info.items():
                    setattr(manifest, key, value)
                if prec in CALIBRATED and isinstance(calib, CalibrationSet):
                    manifest.calibration = calib.describe()
                if sets and info.get("output", {}).get("name", "params") == "params":
                    manifest.parity = parity(reference, open_target(tmp, threads=threads), sets)
                if hasattr(mod, "extra_parity"):  # e.g. ONNX int8 run as fake-quant, or a fused landmark head
                    manifest.parity.update(mod.extra_parity(tmp, reference, sets, threads=threads))
                publish(tmp, dest, manifest)
            results.append(Artifact(dest, manifest))
    return results


def _prepare(folder: Path, verbose: bool) -> None:
    """Create an output folder and clear what interrupted runs left in it (``fileio.remove_stale``: temp folders
    of processes that are gone; an artifact + manifest pair whose renames a SIGKILL split is completed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Edge3dfaError(f"cannot create output folder {folder}: {e.strerror or e}") from e
    for stale in remove_stale(folder):
        if verbose:
            print(f"removed {stale}, left by an interrupted run", file=sys.stderr, flush=True)
