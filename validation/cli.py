"""``edge3dfa validate FOLDER`` and ``edge3dfa export --model mb05``: accuracy, parity and latency reports.

Both end with one verdict (``edge3dfa.validation.gates``), the first line of the terminal summary and of
report.md/html. Exit codes: 0 PASSED; 1 FAILED (a gate failed, or an artifact could not be converted, opened, run
or scored) or NOT VERIFIED (something was not checked: a target skipped with --skip-unavailable, --no-gates, a
gate that could not be computed); 2 bad input, found before any work where it can be (export checks its whole
plan -- formats, precisions, budget -- before converting anything).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
import time
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any

from edge3dfa.errors import Edge3dfaError
from edge3dfa.validation.gates import (
    CEILING_FAILURE_RATE,
    CEILING_NME,
    LOSSLESS_ABS_DELTA_NME,
    LOSSLESS_LANDMARK_PX,
    LOSSY_DELTA_NME,
    LOSSY_DELTA_NME_BIN,
)

#: default AFLW2000-3D faces per evaluation: evenly spaced, enough for ~0.05-point NME precision, and keeps
#: `edge3dfa export` of mb05 to every format quick on 2 cores; --samples all gives the paper's protocol
DEFAULT_SAMPLES = "1000"
#: seconds of timed runs per latency setting: a numpy-evaluated CoreML model at 8 ms/image would otherwise
#: spend ~30 s per artifact; pass 0 for all --latency-runs whatever they take
DEFAULT_LATENCY_BUDGET = 2.0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--samples", default=DEFAULT_SAMPLES,
                   help=f"AFLW2000-3D faces, evenly spaced over the list, or 'all' (default: {DEFAULT_SAMPLES})")
    g.add_argument("--mode", choices=("crops", "pipeline"), default="crops",
                   help="crops: the protocol's 120x120 crops; pipeline: photos -> FaceBoxes -> crop (default: crops)")
    g.add_argument("--ground-truth", choices=("original", "reannotated"), default="original",
                   help="AFLW2000-3D landmarks to score against (default: original)")
    g.add_argument("--crops-dir", help="folder of the 2000 crops instead of the assets' (crops mode)")
    g.add_argument("--images-dir", help="folder of the original photos instead of the assets' (pipeline mode)")
    g.add_argument("--detector", help="FaceBoxes artifact or checkpoint for pipeline mode (default: FaceBoxesProd.pth)")
    g.add_argument("--threads", type=int, help="threads of the accuracy pass (default: 1, the fastest on a busy "
                                               "machine; latency is timed at 1 and all threads anyway)")
    g.add_argument("--batch", type=int, default=64, help="batch size of the accuracy pass (default: 64)")
    g.add_argument("--report-dir", help="where report.json/md/html go (default: the validated folder)")
    g.add_argument("--skip-unavailable", action="store_true",
                   help="skip artifacts whose runtime is not installed here instead of failing them; the verdict "
                        "is then NOT VERIFIED (exit 1), never PASSED")
    lat = p.add_argument_group("latency")
    lat.add_argument("--latency-runs", type=int, default=200,
                     help="timed runs per setting; 0 = no latency (default: 200)")
    lat.add_argument("--latency-warmup", type=int, default=10, help="untimed runs first (default: 10)")
    lat.add_argument("--latency-budget", type=float, default=DEFAULT_LATENCY_BUDGET,
                     help="max seconds of timed runs per setting, at least 10 runs; 0 = always all runs "
                          f"(default: {DEFAULT_LATENCY_BUDGET:g})")
    lat.add_argument("--latency-batch", type=_ints, default=(1, 8), help="batch sizes (default: 1,8)")
    lat.add_argument("--latency-threads", type=_ints, help="thread counts (default: 1 and all CPUs)")
    gates = p.add_argument_group(
        "gates (verdict PASSED: exit 0; FAILED or NOT VERIFIED: exit 1)", textwrap.fill(
        f"Default gates (README 'Default gates'): every target balanced NME <= {CEILING_NME:g}% and failure rate "
        f"<= {CEILING_FAILURE_RATE:g}; fp32/fp16 two-sided vs the reference: |ΔNME| <= {LOSSLESS_ABS_DELTA_NME:g} "
        f"and landmarks within {LOSSLESS_LANDMARK_PX:g} px; other precisions ΔNME <= {LOSSY_DELTA_NME:g} balanced "
        f"and <= {LOSSY_DELTA_NME_BIN:g} in every yaw bin. Without a reference (--reference none) relative gates "
        "compare with the same format's fp32 artifact. A --gates file changes the limits it names; a limit option "
        "below applies to every artifact and wins over both.", 100))
    gates.add_argument("--gates", help="TOML file of gates, with [precision.NAME] / [format.NAME] overrides")
    gates.add_argument("--no-gates", action="store_true",
                       help="no gates at all: the report is written, nothing is judged (verdict NOT VERIFIED)")
    gates.add_argument("--max-delta-nme", type=float, help="max balanced NME minus the base's (points)")
    gates.add_argument("--max-delta-nme-bin", type=float, help="the same for every yaw bin")
    gates.add_argument("--max-abs-delta-nme", type=float, help="max |balanced NME minus the base's| (points)")
    gates.add_argument("--max-nme", type=float, help="max balanced NME (percent)")
    gates.add_argument("--max-param-err", type=float, help="max abs error of normalised params vs the base")
    gates.add_argument("--max-landmark-px", type=float, help="max landmark distance vs the base (crop pixels)")
    gates.add_argument("--max-failure-rate", type=float, help="max fraction of faces with NME > 10%%")


def register_validate(sub: Any) -> None:
    p = sub.add_parser("validate", help="AFLW2000-3D accuracy, parity and latency of every artifact in a folder")
    p.add_argument("folder", help="folder of artifacts with manifests (searched recursively), e.g. out/mb05")
    p.add_argument("--reference", help="PyTorch checkpoint to compare with (default: each manifest's source); "
                                        "'none' scores the artifacts alone, without torch (e.g. on a board)")
    p.add_argument("--no-verify", action="store_true",
                   help="evaluate artifacts even when they do not match their manifests (sha256, format, precision, "
                        "input); by default a mismatch is exit 2")
    _add_eval_options(p)
    p.set_defaults(func=cmd_validate)


def register_export(sub: Any) -> None:
    p = sub.add_parser("export", help="convert to every installed format and precision, validate, report")
    p.add_argument("--model", default="mb05", help="zoo name (default: mb05)")
    p.add_argument("--checkpoint", help="3DDFA_V2 checkpoint to export instead of the zoo's weights")
    p.add_argument("--arch", help="zoo name giving the architecture of --checkpoint (default: inferred)")
    p.add_argument("--to", type=_csv, help="formats, comma separated (default: every installed one)")
    p.add_argument("--precision", type=_csv, help="precisions (default: every one each format offers)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/NAME/FORMAT/ (default: out)")
    p.add_argument("--calib-dir", help="folder of 120x120 face crops for calibrated precisions")
    p.add_argument("--calib-count", type=int, default=256, help="calibration crops (default: 256)")
    p.add_argument("--parity-count", type=int, default=64, help="crops per parity set in manifests (default: 64)")
    p.add_argument("--nme-budget", type=float, metavar="DELTA",
                   help="int8 (CoreML: w8a8): the fastest artifact within DELTA of fp32 on held-out AFLW crops "
                        "(see convert); without other gates, it is then gated at DELTA (2x per yaw bin) on AFLW2000-3D")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --nme-budget: rank every layer by the NME it costs (table and plot in the report)")
    _add_eval_options(p)
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------- shared steps

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_LIMIT_OPTIONS = ("max_delta_nme", "max_delta_nme_bin", "max_abs_delta_nme", "max_nme", "max_param_err",
                  "max_landmark_px", "max_failure_rate")


def _gates(args: argparse.Namespace):  # noqa: ANN202
    """The defaults, then the --gates file over them, then the limit options over everything."""
    from edge3dfa.validation.gates import DEFAULT_GATES, Gates, load_gates, make_limits

    given = {k: getattr(args, k) for k in _LIMIT_OPTIONS if getattr(args, k) is not None}
    cli = make_limits(given, "command line")
    if args.no_gates:
        if args.gates or given:
            raise Edge3dfaError("--no-gates contradicts the gate options given")
        return Gates()
    gates = DEFAULT_GATES.merged(load_gates(args.gates)) if args.gates else DEFAULT_GATES
    return gates.merged(Gates(override=cli))


def _check_threads(args: argparse.Namespace) -> None:
    """Thread counts before any work: one check for every runtime (``edge3dfa.target.check_threads``)."""
    from edge3dfa.target import check_threads

    check_threads(args.threads, "--threads")
    for n in args.latency_threads or ():
        check_threads(n, "--latency-threads")


def _latency(args: argparse.Namespace):  # noqa: ANN202
    from edge3dfa.validation.latency import LatencyConfig

    if args.latency_runs < 0 or args.latency_warmup < 0 or args.latency_budget < 0:
        raise Edge3dfaError("--latency-runs, --latency-warmup and --latency-budget must be >= 0")
    kw = {"threads": args.latency_threads} if args.latency_threads else {}
    return LatencyConfig(batch_sizes=args.latency_batch, warmup=args.latency_warmup, runs=args.latency_runs,
                         budget_s=args.latency_budget or None, **kw)


def _dataset(args: argparse.Namespace):  # noqa: ANN202
    from edge3dfa.validation.datasets import load_crops, load_pipeline

    if args.batch < 1:
        raise Edge3dfaError("--batch must be >= 1")
    if args.mode == "crops":
        return load_crops(args.samples, args.ground_truth, args.crops_dir)
    from edge3dfa import assets
    from edge3dfa.cli import open_artifact
    from edge3dfa.runtime.detect import FaceBoxesDetector

    path = str(args.detector or assets.fetch("faceboxes"))
    net = open_artifact(path, args.threads, not getattr(args, "no_verify", False),
                        **({"arch": "faceboxes"} if path.endswith(".pth") else {}))
    detector = FaceBoxesDetector(lambda blob: tuple(net.run(blob)[:2]), name=net.name)  # upstream's thresholds, NMS
    return load_pipeline(detector, args.samples, args.ground_truth, args.images_dir)


def _finish(result: dict, data: Any, gates: Any, out_dir: Path, not_attempted: list[dict], started: float,
            reference: str) -> int:
    from edge3dfa.validation import report

    rep = report.build(result, data, gates, not_attempted, reference=reference)
    paths = report.write(rep, out_dir)
    report.print_summary(rep)
    _log(f"report: {paths['html']} (+ report.md, report.json) in {time.perf_counter() - started:.0f} s")
    _log(report.verdict_line(rep))
    return 0 if rep["verdict"] == "PASSED" else 1


# ---------------------------------------------------------------- commands

def cmd_validate(args: argparse.Namespace) -> int:
    from edge3dfa.validation.harness import NO_REFERENCE, discover, evaluate

    started = time.perf_counter()
    _check_threads(args)
    folder = Path(args.folder)
    entries = discover(folder, verify=not args.no_verify)
    if args.no_verify:
        _log(f"edge3dfa: warning: --no-verify: the artifacts in {folder} are evaluated without checking them "
             "against their manifests")
    gates, latency = _gates(args), _latency(args)
    _log(f"validating {len(entries)} artifact(s) in {folder}")
    data = _dataset(args)
    out_dir = Path(args.report_dir) if args.report_dir else folder
    result = evaluate(entries, data, latency=latency, reference=args.reference, threads=args.threads,
                      batch=args.batch, root=out_dir, skip_unavailable=args.skip_unavailable, log=_log)
    alone = (args.reference or "").lower() == NO_REFERENCE
    return _finish(result, data, gates, out_dir, [], started, "none" if alone else "pytorch")


def _missing_packages(extra: str) -> list[str]:
    """Packages of edge3dfa's install ``extra`` (pyproject's optional dependencies) that are not installed here."""
    try:
        reqs = requires("edge3dfa") or []
    except PackageNotFoundError:  # run from a source tree without install: nothing to check against
        return []
    out = []
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m and m.group(2) == extra:
            try:
                version(m.group(1))
            except PackageNotFoundError:
                out.append(m.group(1))
    return out


def _plan(args: argparse.Namespace) -> tuple[list[tuple[str, Any, list[str]]], list[dict[str, str]]]:
    """(format, module, precisions) to build and what the default plan leaves out, before any work.

    A plan that cannot be carried out as asked is an Edge3dfaError (exit 2): an empty --to or --precision, an
    unknown format, a format asked for by name whose extra is not installed, a precision no planned format
    offers, a budget that is not a finite number >= 0 or without int8 to apply to. Without --to the plan is
    every installed format; the others are listed as not attempted.
    """
    from edge3dfa.converters import CALIBRATED, FORMATS, format_module

    for option, value in (("--to", args.to), ("--precision", args.precision)):
        if value is not None and not value:
            raise Edge3dfaError(f"{option} names nothing; give a comma-separated list")
    if args.nme_budget is not None and not (math.isfinite(args.nme_budget) and args.nme_budget >= 0):
        raise Edge3dfaError(f"--nme-budget must be a finite number >= 0, got {args.nme_budget}")
    for option in ("calib_count", "parity_count"):
        if getattr(args, option) < 1:
            raise Edge3dfaError(f"--{option.replace('_', '-')} must be >= 1")
    unknown = [f for f in (args.to or []) if f not in FORMATS]
    if unknown:
        raise Edge3dfaError(f"unknown format {unknown[0]!r}; known: {', '.join(FORMATS)}")
    plan, not_attempted = [], []
    for fmt in dict.fromkeys(args.to or FORMATS):
        missing = _missing_packages(fmt)
        if missing:
            why = f"not installed ({', '.join(missing)}); pip install 'edge3dfa[{fmt}]'"
            if args.to:
                raise Edge3dfaError(f"--to {fmt}: the {fmt} converter is {why}")
            not_attempted.append({"what": fmt, "reason": why})
            continue
        mod = format_module(fmt)
        offered = list(mod.PRECISIONS)
        default = list(getattr(mod, "DEFAULT_PRECISIONS", offered))  # a format may keep its lossiest ones opt-in
        wanted = [p for p in dict.fromkeys(args.precision) if p in offered] if args.precision else default
        left = [p for p in args.precision if p not in offered] if args.precision else []
        not_attempted += [{"what": f"{fmt} {p}", "reason": f"{fmt} offers {', '.join(offered)}"} for p in left]
        not_attempted += [{"what": f"{fmt} {p}", "reason": f"opt-in: ask for it with --precision {p}"}
                          for p in offered if not args.precision and p not in default]
        if wanted:
            plan.append((fmt, mod, wanted))
    offered_by = {fmt: list(mod.PRECISIONS) for fmt, mod, _ in plan}
    for p in args.precision or []:
        if not any(p in precs for _, _, precs in plan):
            where = "; ".join(f"{f} offers {', '.join(o)}" for f, o in offered_by.items()) or "no format planned"
            raise Edge3dfaError(f"--precision {p}: no planned format offers it ({where})")
    if not plan:
        raise Edge3dfaError("nothing to export: no converter is installed ("
                            + "; ".join(f"{n['what']}: {n['reason']}" for n in not_attempted) + ")")
    if args.nme_budget is not None and not any(CALIBRATED & set(precs) for _, _, precs in plan):
        raise Edge3dfaError("--nme-budget applies to int8 (CoreML: w8a8), which the plan does not include")
    return plan, not_attempted


def _conversion_error(fmt: str, prec: str, err: Exception, src: Any) -> dict[str, Any]:
    """The report row of a conversion that failed: status error, the reason in one line (+ traceback log)."""
    from edge3dfa.logs import one_line, write_crash_log

    crash = None
    if isinstance(err, Edge3dfaError):
        reason = f"conversion failed: {one_line(err)}"
    elif isinstance(err, OSError):  # full disk, no permission: the user's to fix, no traceback needed
        where = f" {err.filename}" if err.filename else ""
        reason = f"conversion failed: cannot use{where}: {err.strerror or one_line(err)}"
    else:
        crash = write_crash_log(err)
        reason = f"conversion failed: internal error: {type(err).__name__}: {one_line(err)} (traceback: {crash})"
    _log(f"{fmt} {prec}: {reason}")
    return {"key": f"{src.name}/{fmt}/{prec}", "role": "artifact", "status": "error", "reason": reason,
            "model": src.name, "format": fmt, "precision": prec, "runtime": "-", "artifact": None, "manifest": None,
            "size_bytes": 0, "source_sha256": src.sha256, "nme": None, "delta_vs_reference": None,
            "delta_vs_fp32": None, "parity": None, "parity_vs_fp32": None, "latency": [], "latency_note": None,
            "per_face": None, "quantization": None, "crash_log": str(crash) if crash else None}


def _export_gates(args: argparse.Namespace):  # noqa: ANN202
    """The gates of export: with --nme-budget and no delta gate of the user's, int8 is gated at the budget."""
    from edge3dfa.converters import CALIBRATED
    from edge3dfa.validation.gates import Gates, Limits

    gates = _gates(args)
    if args.nme_budget is not None and not (args.gates or args.no_gates or args.max_delta_nme is not None
                                            or args.max_delta_nme_bin is not None):
        budget = Limits(max_delta_nme=args.nme_budget, max_delta_nme_bin=2 * args.nme_budget)
        gates = gates.merged(Gates(precision=tuple((p, budget) for p in sorted(CALIBRATED))))
    return gates


def cmd_export(args: argparse.Namespace) -> int:
    from edge3dfa.converters import CALIBRATED, convert, load_source
    from edge3dfa.manifest import manifest_path
    from edge3dfa.validation.harness import Entry, Reference, evaluate

    started = time.perf_counter()
    _check_threads(args)
    plan, not_attempted = _plan(args)  # a plan that cannot be met fails now, having built nothing
    gates, latency = _export_gates(args), _latency(args)
    for n in not_attempted:
        _log(f"not attempted: {n['what']}: {n['reason']}")
    data = _dataset(args)  # bad dataset options fail now, not after minutes of conversion
    src = load_source(args.checkpoint or args.model, args.arch if args.checkpoint else None)
    if src.is_detector:
        raise Edge3dfaError("export validates landmark regressors; convert the detector with edge3dfa convert")
    calib = None
    if any(p in CALIBRATED for _, _, precs in plan for p in precs):
        from edge3dfa.converters.calibration import load_calibration

        calib = load_calibration(args.calib_dir, count=args.calib_count)
    out_dir = Path(args.out) / src.name
    entries, failed_rows = [], []
    for fmt, _mod, precs in plan:
        for prec in precs:
            try:
                arts = convert(src, to=fmt, precision=prec, out_dir=args.out, calibration=calib,
                               calib_count=args.calib_count, parity_count=args.parity_count, threads=args.threads,
                               nme_budget=args.nme_budget if prec in CALIBRATED else None,
                               sensitivity=args.sensitivity)
            except Exception as e:  # noqa: BLE001 - one failed conversion must not hide the others' report
                failed_rows.append(_conversion_error(fmt, prec, e, src))
                continue
            entries += [Entry(a.path, a.manifest, manifest_path(a.path)) for a in arts]
    ref = Reference(Path(src.path), src.sha256, src.name, None, module=src.model)
    report_dir = Path(args.report_dir) if args.report_dir else out_dir
    result = evaluate(entries, data, latency=latency, reference=ref, threads=args.threads, batch=args.batch,
                      root=report_dir, skip_unavailable=args.skip_unavailable, log=_log)
    result["targets"] += failed_rows
    return _finish(result, data, gates, report_dir, not_attempted, started, "pytorch")
