"""``edge3dfa export``: convert to every installed format and precision, validate every artifact, one report.

The plan is checked whole before any work (exit 2): an unknown or empty ``--to``/``--precision``, a precision no
planned format offers, a format asked for by name whose extra is not installed, a bad budget or option. Without
``--to`` every installed format is planned and the others are listed as not attempted. One failed conversion is
a failed row of the report (FAILED), never a crash that hides the others. The FaceBoxes detector is converted
beside the regressor, to OUT/faceboxes/FORMAT/ (``workflows.detector``), unless ``--no-detector``.

``--quick`` is the first run (``make demo``): fp32 and int8 of every installed format, fewer faces and latency
settings, the same gates. It proves what the full export proves -- every installed format converts, runs and
stays within the gates at fp32 and int8, with a verdict -- and leaves out what a newcomer does not need first:
the other precisions, half of the judge's faces (the slowest evaluation is CoreML's numpy program, per face),
batch 8 timings. Any option of ``QUICK`` given on the command line wins over it.

``--bundle`` adds phone bundles (``edge3dfa.bundle``) to the params artifacts: every planned (format, precision)
whose format builds bundles (``Format.bundles`` and ``Format.check_bundle``) gets its bundle beside its params
artifact, and the detector its detector bundle where the format's ``check_bundle`` takes a detector; the others are
listed as not attempted with the format's reason. Bundles are validated in the same report, scored from their own
landmark output and compared with their params artifacts (``validation.bundles``); the NME-budget search applies
to the params artifacts only.
"""

from __future__ import annotations

import argparse
import re
import time
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any

from edge3dfa import progress
from edge3dfa.errors import Edge3dfaError
from edge3dfa.progress import STEPS, Progress
from edge3dfa.validation.cli import add_eval_options, check_threads_of, dataset_of, finish, gates_of, latency_of, log
from edge3dfa.validation.rows import Row

#: what ``--quick`` sets, where the command line does not (README "Two commands": make demo)
QUICK: dict[str, Any] = {"precision": "fp32,int8", "samples": "500", "latency_batch": (1,), "latency_budget": 0.5}


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def apply_quick(args: argparse.Namespace) -> None:
    """Fill the options of ``QUICK`` the user did not give: with ``--quick`` its values, else the full defaults;
    ``args.quick_set`` names those ``--quick`` set (the plan lists what it left out)."""
    quick, full = getattr(args, "quick", False), getattr(args, "full_defaults", {})
    args.quick_set = [k for k in QUICK if quick and getattr(args, k, None) is None]
    for key in QUICK:
        if getattr(args, key, None) is None:
            setattr(args, key, QUICK[key] if quick else full.get(key))


def register_export(sub: Any) -> None:
    from edge3dfa.workflows.cli import add_conversion_options

    p = sub.add_parser("export", help="convert to every installed format and precision, validate, report")
    p.add_argument("--model", default="mb05", help="zoo name (default: mb05)")
    p.add_argument("--checkpoint", help="3DDFA_V2 checkpoint to export instead of the zoo's weights")
    p.add_argument("--arch", help="zoo name giving the architecture of --checkpoint (default: inferred)")
    p.add_argument("--to", help="formats, comma separated (default: every installed one)")
    p.add_argument("--precision", help="precisions (default: each format's default precisions)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/NAME/FORMAT/ (default: out)")
    p.add_argument("--parity-count", type=int, default=64, help="crops per parity set in manifests (default: 64)")
    p.add_argument("--no-detector", action="store_true",
                   help="only the regressor: do not convert the FaceBoxes detector (by default it is converted at "
                        "fp32 to each planned format that takes it, to OUT/faceboxes/FORMAT/, and judged in the "
                        "report on its parity vs PyTorch on the example photos)")
    p.add_argument("--bundle", action="store_true",
                   help="also build a phone bundle of every planned format and precision that bundles (uint8 crop "
                        "in, landmarks/pose/params out: README 'On the phone'), and the detector's where the format "
                        "bundles a detector, beside the params artifacts; validated in the same report (section "
                        "'Phone bundles'); the others are listed as not attempted; channel order with --option "
                        "bundle.channels=bgr|rgb")
    p.add_argument("--quick", action="store_true",
                   help="a first run (make demo): " + ", ".join(f"--{k.replace('_', '-')} {_text(v)}"
                                                                for k, v in QUICK.items())
                        + "; the same gates (options given explicitly win)")
    add_conversion_options(p)
    add_eval_options(p)
    # None = not given: --quick or the full defaults fill it in (apply_quick)
    p.set_defaults(func=cmd_export, full_defaults={k: p.get_default(k) for k in QUICK}, **dict.fromkeys(QUICK))


def missing_packages(extra: str) -> list[str]:
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


def plan_export(args: argparse.Namespace) -> tuple[list[tuple[Any, list[str]]], list[dict[str, str]]]:
    """(format, precisions) to build and what the default plan leaves out, before any work (see module docstring)."""
    from edge3dfa.converters import formats, get_format, plan_list

    asked = plan_list(args.to, "format") if args.to is not None else None
    wanted_precisions = plan_list(args.precision, "precision") if args.precision is not None else None
    for option in ("parity_count",):
        if getattr(args, option) < 1:
            raise Edge3dfaError(f"--{option.replace('_', '-')} must be >= 1")
    quick_precisions = "precision" in getattr(args, "quick_set", ())
    known = formats()
    unknown = [f for f in asked or [] if f not in known]
    if unknown:
        raise Edge3dfaError(f"unknown format {unknown[0]!r}; known: {', '.join(sorted(known))}")
    plan, not_attempted = [], []
    for name in asked or sorted(known):
        missing = missing_packages(name)
        if missing:
            why = f"not installed ({', '.join(missing)}); pip install 'edge3dfa[{name}]'"
            if asked is not None:
                raise Edge3dfaError(f"--to {name}: the {name} converter is {why}")
            not_attempted.append({"what": name, "reason": why})
            continue
        fmt = get_format(name)
        offered, default = list(fmt.precisions), list(fmt.default_precisions)
        wanted = [p for p in wanted_precisions if p in offered] if wanted_precisions else default
        left = [p for p in wanted_precisions if p not in offered] if wanted_precisions else []
        not_attempted += [{"what": f"{name} {p}", "reason": f"{name} offers {', '.join(offered)}"} for p in left]
        not_attempted += [{"what": f"{name} {p}", "reason": f"opt-in: ask for it with --precision {p}"}
                          for p in offered if not wanted_precisions and p not in default]
        if quick_precisions:
            not_attempted += [{"what": f"{name} {p}", "reason": "left out by --quick (make demo); export without "
                               "--quick builds it (make demo-full)"} for p in default if p not in wanted]
        if wanted:
            plan.append((fmt, wanted))
    for p in wanted_precisions or []:
        if not quick_precisions and not any(p in precs for _, precs in plan):  # --quick asks for what is offered
            where = "; ".join(f"{f.name} offers {', '.join(f.precisions)}" for f, _ in plan) or "no format planned"
            raise Edge3dfaError(f"--precision {p}: no planned format offers it ({where})")
    if not plan:
        raise Edge3dfaError("nothing to export: no converter is installed ("
                            + "; ".join(f"{n['what']}: {n['reason']}" for n in not_attempted) + ")")
    return plan, not_attempted


def plan_bundles(plan: list[tuple[Any, list[str]]], options: dict[str, dict[str, Any]]
                 ) -> tuple[list[tuple[Any, list[str]]], list[dict[str, str]]]:
    """The (format, precisions) of the plan whose phone bundles are built, and those not offered with the format's
    reason (``Format.check_bundle``); --bundle with no bundle at all to build is an error, before any work."""
    from edge3dfa.logs import one_line

    take, skip = [], []
    for fmt, precs in plan:
        opts = fmt.Options.parse(options[fmt.name])
        ok = []
        for prec in precs:
            try:
                fmt.check_bundle(prec, False, opts)
            except Edge3dfaError as e:
                skip.append({"what": f"{fmt.name} {prec} bundle", "reason": one_line(e)})
            else:
                ok.append(prec)
        if ok:
            take.append((fmt, ok))
    if not take:
        raise Edge3dfaError("--bundle: no planned format and precision builds phone bundles ("
                            + "; ".join(f"{n['what']}: {n['reason']}" for n in skip) + ")")
    return take, skip


def target_label(fmt: str, prec: str, bundle: bool = False) -> str:
    """An artifact's name in export's progress display, e.g. "onnx int8" (+ " bundle"): one place for the labels
    announced up front and the ones each conversion reports, which must be equal."""
    return f"{fmt} {prec}{' bundle' if bundle else ''}"


def conversion_error(fmt: str, prec: str, err: Exception, src: Any, bundle: bool = False) -> Row:
    """The report row of a conversion that failed: status error, the reason in one line (+ traceback log)."""
    from dataclasses import replace

    from edge3dfa.validation.harness import artifact_row
    from edge3dfa.workflows.detector import failure_reason

    reason, crash = failure_reason(err)
    what = f"{prec} bundle" if bundle else prec
    log(f"{fmt} {what}: {reason}")
    row = artifact_row(f"{src.name}/{fmt}/{what}", model=src.name, fmt=fmt, precision=prec, source_sha=src.sha256)
    if bundle:  # a bundle row, so that the Phone bundles section lists it too
        row = replace(row, bundle={"contract_version": None, "channel_order": None, "layout": None,
                                   "spec_parity": {}, "vs_params": None})
    return row.failed(reason, str(crash) if crash else None)


def export_gates(args: argparse.Namespace, calibrated: set[str]) -> Any:
    """The gates of export: with --nme-budget and no delta gate of the user's, int8 is gated at the budget."""
    from edge3dfa.validation.gates import Gates, Limits

    gates = gates_of(args)
    if args.nme_budget is not None and not (args.gates or args.no_gates or args.max_delta_nme is not None
                                            or args.max_delta_nme_bin is not None):
        nme = float(args.nme_budget)
        budget = Limits(max_delta_nme=nme, max_delta_nme_bin=2 * nme)
        gates = gates.merged(Gates(precision=tuple((p, budget) for p in sorted(calibrated))))
    return gates


def cmd_export(args: argparse.Namespace) -> int:
    from edge3dfa.converters import load_calibration_set, split_options
    from edge3dfa.manifest import manifest_path
    from edge3dfa.models.checkpoint import Checkpoint
    from edge3dfa.validation.harness import Entry, evaluate
    from edge3dfa.workflows import convert
    from edge3dfa.workflows.cli import budget_of, bundle_of, calibration_of, check_out, list_options, parse_options
    from edge3dfa.workflows.detector import detector_label, export_detector, plan_detector, plan_detector_bundles

    started = time.perf_counter()
    apply_quick(args)
    check_threads_of(args)
    plan, not_attempted = plan_export(args)  # a plan that cannot be met fails now, having built nothing
    if args.list_options:
        return list_options([f.name for f, _ in plan])
    check_out(args.out)
    given = parse_options(args.option)
    bundle = bundle_of(args, given)  # takes the bundle.KEY options out of the formats'
    options = split_options(given, [f.name for f, _ in plan])
    for fmt, _ in plan:
        fmt.Options.parse(options[fmt.name])  # a typo fails now
    bundle_plan, left_out = plan_bundles(plan, options) if bundle is not None else ([], [])
    not_attempted += left_out
    calibrated = {p for f, precs in plan for p in precs if p in f.calibrated}
    budget, calibration = budget_of(args), calibration_of(args)
    if budget is not None and "int8" not in calibrated:
        raise Edge3dfaError("--nme-budget applies to int8, which the plan does not include")
    gates, latency = export_gates(args, calibrated), latency_of(args)
    detector_formats, left_out = plan_detector([f for f, _ in plan], args.no_detector)
    not_attempted += left_out
    detector_bundles, left_out = plan_detector_bundles(detector_formats, bundle)
    not_attempted += left_out
    for reason in dict.fromkeys(n["reason"] for n in not_attempted):  # one line per reason
        log(f"not attempted: {', '.join(n['what'] for n in not_attempted if n['reason'] == reason)}: {reason}")
    data = dataset_of(args)  # bad dataset options fail now, not after minutes of conversion
    src = Checkpoint.open(args.checkpoint or args.model, args.arch if args.checkpoint else None)
    if src.is_detector:
        raise Edge3dfaError("export takes a landmark regressor (--model mb05) and converts the FaceBoxes detector "
                            "beside it; to convert the detector alone: edge3dfa convert --model faceboxes")
    calib = load_calibration_set(calibration) if calibrated else None
    entries, failed_rows = [], []
    steps = [s for s in STEPS if latency.enabled or s != "latency"]
    jobs = [(fmt, prec, None) for fmt, precs in plan for prec in precs]
    jobs += [(fmt, prec, bundle) for fmt, precs in bundle_plan for prec in precs]
    labels = ([target_label(fmt.name, prec, bundled is not None) for fmt, prec, bundled in jobs]
              + [detector_label(f) for f in detector_formats]
              + [detector_label(f, bundle=True) for f in detector_bundles])
    bar = Progress(labels, steps=steps,
                   reference_steps=[s for s in steps if s in ("evaluate", "latency")], started=started)
    with bar:  # one display over conversion and evaluation: artifact i of n, step, elapsed, ETA (edge3dfa.progress)
        for fmt, prec, bundled in jobs:
            with progress.target(target_label(fmt.name, prec, bundled is not None)):
                try:
                    arts = convert(src, to=fmt.name, precision=prec, out_dir=args.out,
                                   options=options[fmt.name], calibration=calib,
                                   budget=budget if prec in fmt.calibrated and bundled is None else None,
                                   parity_count=args.parity_count, threads=args.threads, bundle=bundled)
                except Exception as e:  # noqa: BLE001 - one failed conversion must not hide the others' report
                    failed_rows.append(conversion_error(fmt.name, prec, e, src, bundle=bundled is not None))
                    progress.skip_rest()
                    continue
            entries += [Entry(a.path, a.manifest, manifest_path(a.path)) for a in arts]
        report_dir = Path(args.report_dir) if args.report_dir else Path(args.out) / src.name
        detectors = export_detector(detector_formats, src, args.out, report_dir, threads=args.threads, log=log)
        detectors += export_detector(detector_bundles, src, args.out, report_dir, threads=args.threads, log=log,
                                     bundle=bundle)
        result = evaluate(entries, data, latency=latency, reference=src, threads=args.threads, batch=args.batch,
                          root=report_dir, skip_unavailable=args.skip_unavailable, log=log)
    result["detectors"] = detectors
    result["targets"] += failed_rows
    result["timings"] = bar.timings()
    return finish(result, data, gates, report_dir, not_attempted, started, "pytorch")
