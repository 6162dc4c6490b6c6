"""``export``'s detector: FaceBoxes converted beside the regressor's artifacts, so one export gives a device both
models that ``edge3dfa run --artifact R --detector D`` needs.

For each planned format whose converter takes the detector (``Format.check`` at fp32 with the format's default
options: ONNX, TFLite, CoreML; ExecuTorch converts the regressors only and is listed as not attempted), FaceBoxes is
converted at fp32 to ``OUT/faceboxes/FORMAT/faceboxes_fp32.SUFFIX`` with its manifest, as ``edge3dfa convert --model
faceboxes --to FORMAT --out OUT`` writes it. Only fp32: the calibrated precisions calibrate on face crops, not photos,
and the detector's figures are judged with the lossless limits (``validation.detectors``). The user's ``--option``
values are the regressor's; the detector gets each format's defaults (TFLite: 480x640 input). Its parity is measured
on the example photos only (``measure.parity.detector_parity``, with the exported regressor for the landmark
figures), which keeps the cost to the conversion itself. A failed conversion is a FAILED detector row of the report,
never a crash; ``--no-detector`` leaves the detector out (and says so in the report).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge3dfa import progress
from edge3dfa.converters import Format
from edge3dfa.errors import Edge3dfaError
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.validation.detectors import DetectorRow

DETECTOR, PRECISION = "faceboxes", "fp32"


def plan_detector(formats: Sequence[Format], leave_out: bool) -> tuple[list[Format], list[dict[str, str]]]:
    """The planned formats the detector is converted to, and what is left out and why (checks only, no work)."""
    if leave_out:
        return [], [{"what": f"{DETECTOR} (detector)", "reason": "left out with --no-detector"}]
    return _split(formats, bundle=False)


def plan_detector_bundles(formats: Sequence[Format], bundle: object | None
                          ) -> tuple[list[Format], list[dict[str, str]]]:
    """Of the formats the detector is converted to, those that also build its phone bundle (``--bundle``:
    ``Format.check_bundle`` for a detector at fp32), and the others with the format's reason."""
    if bundle is None:
        return [], []
    return _split(formats, bundle=True)


def _split(formats: Sequence[Format], bundle: bool) -> tuple[list[Format], list[dict[str, str]]]:
    """The formats whose ``check`` (``check_bundle`` for a bundle) takes the detector at fp32 with default options,
    and the others with the format's reason in one line."""
    from edge3dfa.logs import one_line

    take, skip = [], []
    for fmt in formats:
        check = fmt.check_bundle if bundle else fmt.check
        try:
            check(PRECISION, True, fmt.Options.parse({}))
        except Edge3dfaError as e:
            skip.append({"what": f"{DETECTOR} {fmt.name}{' bundle' if bundle else ''}", "reason": one_line(e)})
        else:
            take.append(fmt)
    return take, skip


def failure_reason(err: Exception) -> tuple[str, Path | None]:
    """A failed conversion in one line, and the traceback log of an unexpected exception (None otherwise)."""
    from edge3dfa.logs import one_line, write_crash_log

    if isinstance(err, Edge3dfaError):
        return f"conversion failed: {one_line(err)}", None
    if isinstance(err, OSError):  # full disk, no permission: the user's to fix, no traceback needed
        where = f" {err.filename}" if err.filename else ""
        return f"conversion failed: cannot use{where}: {err.strerror or one_line(err)}", None
    crash = write_crash_log(err)
    return f"conversion failed: internal error: {type(err).__name__}: {one_line(err)} (traceback: {crash})", crash


def detector_label(fmt: Format, bundle: bool = False) -> str:
    """The detector's name in export's progress display and timings, e.g. "faceboxes onnx fp32" (+ " bundle")."""
    return f"{DETECTOR} {fmt.name} {PRECISION}{' bundle' if bundle else ''}"


def export_detector(formats: Sequence[Format], regressor: Checkpoint, out: str | os.PathLike,
                    report_dir: str | os.PathLike, threads: int | None = None,
                    log: Callable[[str], None] = print, bundle: object | None = None) -> list[DetectorRow]:
    """FaceBoxes at fp32 to each of ``formats`` under ``out``; one ``DetectorRow`` each (paths relative to
    ``report_dir``), with the seconds its conversion and parity took. ``regressor``: the landmark model of the
    parity's landmark figures (the exported one). ``bundle``: its phone bundles instead (``bundle.BundleOptions``)."""
    from edge3dfa.converters import convert
    from edge3dfa.manifest import manifest_path

    rows = []
    for fmt in formats:
        label = detector_label(fmt, bundle is not None)
        key = f"{DETECTOR}/{fmt.name}/{PRECISION}{' bundle' if bundle is not None else ''}"
        started = time.perf_counter()
        try:
            with progress.target(label):  # convert + parity; no evaluate/latency of its own
                try:
                    [art] = convert(DETECTOR, to=fmt.name, precision=PRECISION, out_dir=out, threads=threads,
                                    landmarks_with=regressor, bundle=bundle)
                finally:
                    progress.skip_rest()
        except Exception as e:  # noqa: BLE001 - a failed detector is a FAILED row, never a crash that hides the rest
            reason, crash = failure_reason(e)
            log(f"{label}: {reason}")
            rows.append(DetectorRow(key=key, model=DETECTOR, format=fmt.name, precision=PRECISION, status="error",
                                    reason=reason, seconds=time.perf_counter() - started,
                                    crash_log=str(crash) if crash else None, bundle=bundle is not None))
            continue
        seconds = time.perf_counter() - started
        log(f"{label}: {art.path} in {seconds:.1f} s (conversion + parity)")
        rows.append(DetectorRow(key=key, model=DETECTOR, format=fmt.name, precision=PRECISION,
                                artifact=os.path.relpath(art.path, report_dir),
                                manifest=os.path.relpath(manifest_path(art.path), report_dir),
                                size_bytes=art.manifest.size_bytes, parity=art.manifest.parity, seconds=seconds,
                                bundle=bundle is not None))
    return rows

