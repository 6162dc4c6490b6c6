"""One call from a checkpoint to deployable artifacts: ``convert("mb05", to="onnx", precision="int8")``.

Formats implement ``converters.base.Format`` and register under the ``edge3dfa.converters`` entry points; this
module knows none by name. ``convert`` plans first (``plan``: every format found, every precision offered, every
option parsed into the format's typed ``Options``, the calibration folder and count checked: a typo fails before
anything is loaded or written), then converts one artifact at a time (``convert_one``): the format writes it into a
temp folder beside the destination, parity against PyTorch goes into its manifest, and artifact and manifest are
moved into place as a pair (``manifest.publish``: a failure leaves the old pair or neither). Temp folders that a
killed run left in the output folders are removed first (``fileio.remove_stale``).

The NME-budget search is not here: it judges int8 variants on held-out crops, which is a workflow over converters
and measurement (``edge3dfa.workflows``); it plugs in through ``write_int8``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa import progress
from edge3dfa.converters.base import Format, formats, get_format
from edge3dfa.datasets.calibration import CalibrationSet
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import remove_stale, temp_folder, write_errors
from edge3dfa.manifest import Manifest, publish
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.options import Options, option
from edge3dfa.target import Target, check_threads

__all__ = ["Artifact", "Calibration", "Checkpoint", "Format", "Plan", "convert", "convert_one", "formats",
           "get_format", "plan", "plan_list"]

PARITY_COUNT = 64
#: the landmark model a detector's parity measures its landmark change with, unless told: the zoo's default
DETECTOR_LANDMARKS_WITH = "mb05"
#: writes one calibrated int8 artifact at ``dest`` instead of the format's own ``write`` (the NME-budget search)
Int8Writer = Callable[[Format, Checkpoint, Path, Options, CalibrationSet, Target], dict[str, Any]]


@dataclass(frozen=True)
class Calibration(Options):
    """Which face crops calibrated precisions (int8) are calibrated on."""

    label = "calibration option"
    folder: str | None = option(None, "folder of 120x120 face crops or photos (default: the 512 AFLW crops "
                                      "disjoint from AFLW2000-3D)")
    count: int = option(256, "how many, the first in file-name order")

    def check(self) -> None:
        if self.count < 1:
            raise Edge3dfaError(f"--calib-count must be at least 1, got {self.count}")


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Plan:
    """What ``convert`` will build, checked before any work: the source, and per format its precisions and options."""

    source: Checkpoint
    formats: dict[str, Format]
    precisions: tuple[str, ...]
    options: dict[str, Options]

    @property
    def calibrated(self) -> bool:
        return any(p in f.calibrated for f in self.formats.values() for p in self.precisions)


def plan_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    """``"onnx,tflite"`` or ``["onnx", "tflite"]`` -> ``["onnx", "tflite"]`` (blanks and repeats dropped); an
    empty list is an error: a plan that would build nothing must not look like success."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    out = list(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    if not out:
        known = ", ".join(formats()) if what == "format" else "e.g. fp32, fp16, int8"
        raise Edge3dfaError(f"no {what} given ({known}); nothing to convert")
    return out


def split_options(options: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-format option dicts from ``{"onnx": {...}}``, ``{"onnx.exclude": ...}`` or, when one format is
    converted, bare keys ``{"exclude": ...}``. A bare key with several formats is ambiguous: an error."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping) and key in out:
            out[key].update(value)
            continue
        fmt, dot, name = key.partition(".")
        if dot:
            if fmt not in out:
                raise Edge3dfaError(f"option {key}: {fmt} is not among the formats converted ({', '.join(names)})")
            out[fmt][name] = value
        elif len(names) == 1:
            out[names[0]][key] = value
        else:
            raise Edge3dfaError(f"option {key}: say which format it is for, e.g. --option {names[0]}.{key}=VALUE "
                                f"(converting {', '.join(names)})")
    return out


def plan(model: str | os.PathLike | Checkpoint, to: str | Sequence[str], precision: str | Sequence[str],
         options: Mapping[str, Any] | None = None, calibration: Any = None, bundle: Any = None) -> Plan:
    """Everything ``convert`` needs to know before it starts, checked; a user error raises here.
    ``bundle``: None (params artifacts), True, a dict or ``bundle.BundleOptions`` (phone bundles)."""
    names, precisions = plan_list(to, "format"), plan_list(precision, "precision")
    fmts = {n: get_format(n) for n in names}
    for fmt in fmts.values():
        bad = [p for p in precisions if p not in fmt.precisions]
        if bad:
            raise Edge3dfaError(f"{fmt.name} does not offer precision {', '.join(bad)}; "
                                f"it offers {', '.join(fmt.precisions)}")
    parsed = {n: fmts[n].Options.parse(o) for n, o in split_options(options, names).items()}
    if any(p in f.calibrated for f in fmts.values() for p in precisions) and not isinstance(calibration,
                                                                                          CalibrationSet):
        from edge3dfa.datasets.calibration import calibration_files

        spec = _calibration_spec(calibration)
        calibration_files(spec.folder, spec.count)  # a bad folder or count fails now, not after loading the model
    bundle_options = _bundle_options(bundle)
    source = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    for n, fmt in fmts.items():
        for p in precisions:
            fmt.check(p, source.is_detector, parsed[n])
            if bundle_options is not None:
                fmt.check_bundle(p, source.is_detector, parsed[n])
    if bundle_options is not None:
        source = source.bundled(bundle_options)
    return Plan(source, fmts, tuple(precisions), parsed)


def _bundle_options(bundle: Any) -> Any:
    from edge3dfa.bundle import BundleOptions

    if bundle is None or bundle is False:
        return None
    if isinstance(bundle, BundleOptions):
        return bundle
    return BundleOptions.parse({} if bundle is True else bundle)


def artifact_name(source: Checkpoint, precision: str, suffix: str) -> str:
    """NAME_PRECISION.SUFFIX; a phone bundle NAME_PRECISION_bundle.SUFFIX (beside the params artifact)."""
    return f"{source.name}_{precision}{'_bundle' if source.bundle is not None else ''}{suffix}"


def _calibration_spec(calibration: Any) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    if calibration is None or isinstance(calibration, (str, os.PathLike)):
        return Calibration(folder=None if calibration is None else str(calibration))
    return Calibration.parse(calibration)


def load_calibration_set(calibration: Any) -> CalibrationSet:
    """A CalibrationSet as given, or loaded from a ``Calibration`` / folder / dict."""
    if isinstance(calibration, CalibrationSet):
        return calibration
    from edge3dfa.datasets.calibration import load_calibration

    spec = _calibration_spec(calibration)
    return load_calibration(spec.folder, count=spec.count)


def convert(model: str | os.PathLike | Checkpoint = "mb05", to: str | Sequence[str] = "onnx",
            precision: str | Sequence[str] = "fp32", out_dir: str | os.PathLike = "out", *,
            options: Mapping[str, Any] | None = None, calibration: Any = None, bundle: Any = None,
            parity_count: int = PARITY_COUNT,
            threads: int | None = None, verbose: bool = True, write_int8: Int8Writer | None = None,
            landmarks_with: str | os.PathLike | Checkpoint | None = DETECTOR_LANDMARKS_WITH) -> list[Artifact]:
    """Convert ``model`` (zoo name, checkpoint path or ``Checkpoint``) to every format in ``to`` at every
    precision; artifacts go to OUT/NAME/FORMAT/NAME_PRECISION.SUFFIX with a manifest beside each.

    ``options``: per format (``{"onnx": {"opset": 18}}`` or ``{"onnx.opset": 18}``; bare keys when one format).
    ``calibration``: a CalibrationSet, a ``Calibration``, a folder, or None (the default disjoint crops); loaded
    only when a calibrated precision is asked for.
    ``bundle``: None for params artifacts; True, ``{"channels": "rgb"}`` or a ``bundle.BundleOptions`` for phone
    bundles (``edge3dfa.bundle``), written as OUT/NAME/FORMAT/NAME_PRECISION_bundle.SUFFIX.
    ``landmarks_with``: for a detector, the landmark model (zoo name, checkpoint or ``Checkpoint``) whose landmarks
    on the parity photos measure what the artifact changes downstream (``measure.parity.detector_parity``); None
    leaves that out.
    """
    check_threads(threads, "--threads")
    p = plan(model, to, precision, options, calibration, bundle)
    calib = load_calibration_set(calibration) if p.calibrated else None
    reference = p.source.target(threads)
    regressor = _landmark_model(landmarks_with, threads, verbose) if p.source.is_detector else None
    sets = {} if p.source.is_detector else parity_sets(parity_count)
    out = Path(out_dir) / p.source.name
    _prepare(out, verbose)
    results = []
    for name, fmt in p.formats.items():
        for prec in p.precisions:
            dest = out / name / artifact_name(p.source, prec, fmt.suffix)
            if verbose:
                progress.status(f"converting {p.source.name} -> {name} {prec} ...")
            results.append(convert_one(fmt, p.source, prec, dest, p.options[name],
                                       calib if prec in fmt.calibrated else None, reference, sets, threads=threads,
                                       verbose=verbose, write_int8=write_int8, regressor=regressor))
    return results


def _landmark_model(model: str | os.PathLike | Checkpoint | None, threads: int | None, verbose: bool) -> Target | None:
    """The PyTorch landmark model of a detector's landmark figures; None (figures left out, with a warning) when it
    cannot be opened, e.g. its weights are not in the assets: the detector still converts."""
    if model is None:
        return None
    try:
        return (model if isinstance(model, Checkpoint) else Checkpoint.open(model)).target(threads)
    except Edge3dfaError as e:
        if verbose:
            progress.echo(f"edge3dfa: warning: the detector's landmark figures are left out: {e}")
        return None


def parity_sets(count: int = PARITY_COUNT) -> dict[str, np.ndarray]:
    """The crops parity is measured on: the first AFLW2000-3D crops, and the LAST crops of the default calibration
    folder, which int8 calibration (the first ``count`` in file-name order) does not see unless it asks for nearly
    all 512: figures stay held out."""
    from edge3dfa.datasets.calibration import load_calibration, load_eval_crops

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise Edge3dfaError(f"parity count must be a whole number >= 1, got {count!r}")
    return {"aflw2000": load_eval_crops(count),
            "calibration": load_calibration(None, count=512, check_disjoint=False).data[-count:]}


def convert_one(fmt: Format, source: Checkpoint, precision: str, dest: Path, options: Options,
                calibration: CalibrationSet | None, reference: Target, sets: dict[str, np.ndarray], *,
                threads: int | None = None, verbose: bool = True, write_int8: Int8Writer | None = None,
                regressor: Target | None = None) -> Artifact:
    """One artifact: written in a temp folder, its parity measured, published with its manifest as a pair.
    ``regressor``: for a detector, the landmark model of ``detector_parity``'s landmark figures."""
    from edge3dfa.measure.parity import bundle_parity, detector_bundle_parity, detector_parity, parity
    from edge3dfa.target import open_target

    _prepare(dest.parent, verbose)
    with temp_folder(dest.parent, "convert", dest=dest) as work, write_errors([dest], work):
        tmp = work / dest.name
        with progress.step("convert"):
            if write_int8 is not None and calibration is not None and not source.is_detector \
                    and source.bundle is None:
                fields = write_int8(fmt, source, tmp, options, calibration, reference)
            else:
                fields = fmt.write(source, tmp, precision, options, calibration)
        manifest = Manifest(artifact=dest.name, format=fmt.name, precision=precision, model=source.name,
                            arch=source.arch, source=source.describe())
        manifest = replace(manifest, **fields)  # a field the manifest does not have is a bug: TypeError
        if calibration is not None:
            manifest = replace(manifest, calibration=calibration.describe())
        figures: dict[str, Any] = {}
        with progress.step("parity"):
            if source.bundle is not None and not source.is_detector:
                figures = bundle_parity(reference, open_target(tmp, threads=threads, verify=False), sets)
            elif source.bundle is not None:
                figures = detector_bundle_parity(reference, open_target(tmp, threads=threads, verify=False),
                                                 regressor=regressor)
            elif source.is_detector:
                figures = detector_parity(reference, open_target(tmp, threads=threads, verify=False),
                                          regressor=regressor)
            elif manifest.output.get("name", "params") == "params":
                figures = parity(reference, open_target(tmp, threads=threads, verify=False), sets)
            manifest = replace(manifest, parity={**figures, **fmt.extra_parity(tmp, reference, sets, threads)})
        publish(tmp, dest, manifest)
    return Artifact(dest, manifest)


def _prepare(folder: Path, verbose: bool) -> None:
    """Create an output folder and clear what interrupted runs left in it (``fileio.remove_stale``: temp folders
    of processes that are gone; an artifact + manifest pair whose renames a SIGKILL split is completed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Edge3dfaError(f"cannot create output folder {folder}: {e.strerror or e}") from e
    for stale in remove_stale(folder):
        if verbose:
            progress.echo(f"removed {stale}, left by an interrupted run")
