"""``edge3dfa validate FOLDER`` and ``edge3dfa export --model mb05``: accuracy, parity and latency reports.

Exit codes: 0 all gates passed, 1 a gate failed (or a conversion failed in export), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from edge3dfa.errors import Edge3dfaError

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
    lat = p.add_argument_group("latency")
    lat.add_argument("--latency-runs", type=int, default=200,
                     help="timed runs per setting; 0 = no latency (default: 200)")
    lat.add_argument("--latency-warmup", type=int, default=10, help="untimed runs first (default: 10)")
    lat.add_argument("--latency-budget", type=float, default=DEFAULT_LATENCY_BUDGET,
                     help="max seconds of timed runs per setting, at least 10 runs; 0 = always all runs "
                          f"(default: {DEFAULT_LATENCY_BUDGET:g})")
    lat.add_argument("--latency-batch", type=_ints, default=(1, 8), help="batch sizes (default: 1,8)")
    lat.add_argument("--latency-threads", type=_ints, help="thread counts (default: 1 and all CPUs)")
    gates = p.add_argument_group("gates (exit code 1 when one fails)")
    gates.add_argument("--gates", help="TOML file of gates, with [precision.NAME] / [format.NAME] overrides")
    gates.add_argument("--no-gates", action="store_true",
                       help="no gates at all (default without any gate option: ΔNME <= 0.10 for fp32/fp16, "
                            "<= 0.50 for other precisions)")
    gates.add_argument("--max-delta-nme", type=float, help="max balanced NME minus the PyTorch reference's (points)")
    gates.add_argument("--max-delta-nme-bin", type=float, help="the same for every yaw bin")
    gates.add_argument("--max-nme", type=float, help="max balanced NME (percent)")
    gates.add_argument("--max-param-err", type=float, help="max abs error of normalised params vs the reference")
    gates.add_argument("--max-landmark-px", type=float, help="max landmark distance vs the reference (crop pixels)")
    gates.add_argument("--max-failure-rate", type=float, help="max fraction of faces with NME > 10%%")


def register_validate(sub: Any) -> None:
    p = sub.add_parser("validate", help="AFLW2000-3D accuracy, parity and latency of every artifact in a folder")
    p.add_argument("folder", help="folder of artifacts with manifests (searched recursively), e.g. out/mb05")
    p.add_argument("--reference", help="PyTorch checkpoint to compare with (default: each manifest's source); "
                                        "'none' scores the artifacts alone, without torch (e.g. on a board)")
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


def _gates(args: argparse.Namespace):  # noqa: ANN202
    from edge3dfa.validation.gates import DEFAULT_GATES, Gates, Limits, load_gates

    cli = Limits(max_delta_nme=args.max_delta_nme, max_delta_nme_bin=args.max_delta_nme_bin, max_nme=args.max_nme,
                 max_param_err=args.max_param_err, max_landmark_px=args.max_landmark_px,
                 max_failure_rate=args.max_failure_rate)
    if args.no_gates:
        if args.gates or cli.to_dict():
            raise Edge3dfaError("--no-gates contradicts the gate options given")
        return Gates()
    if not args.gates and not cli.to_dict():
        return DEFAULT_GATES
    gates = load_gates(args.gates) if args.gates else Gates()
    return Gates(gates.default.merged(cli), gates.precision, gates.format)


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
    from edge3dfa.runtime.detect import FaceBoxesDetector
    from edge3dfa.target import open_target

    path = args.detector or assets.fetch("faceboxes")
    net = open_target(path, threads=args.threads, **({"arch": "faceboxes"} if str(path).endswith(".pth") else {}))
    detector = FaceBoxesDetector(lambda blob: tuple(net.run(blob)[:2]))  # upstream's thresholds and NMS
    return load_pipeline(detector, args.samples, args.ground_truth, args.images_dir)


def _finish(result: dict, data: Any, gates: Any, out_dir: Path, skipped: list[dict], started: float) -> int:
    from edge3dfa.validation import report

    rep = report.build(result, data, gates, skipped)
    paths = report.write(rep, out_dir)
    report.print_summary(rep)
    _log(f"report: {paths['html']} (+ report.md, report.json) in {time.perf_counter() - started:.0f} s")
    for t in rep["targets"]:
        for g in t["gates"]:
            if not g["passed"]:
                _log(f"gate failed: {t['key']}: {g['gate']} {g['value']} > {g['limit']}")
        if t["status"] == "failed":
            _log(f"failed: {t['key']}: {t['reason']}")
    return 0 if rep["passed"] else 1


# ---------------------------------------------------------------- commands

def cmd_validate(args: argparse.Namespace) -> int:
    from edge3dfa.validation.harness import discover, evaluate

    started = time.perf_counter()
    folder = Path(args.folder)
    entries = discover(folder)
    gates, latency = _gates(args), _latency(args)
    _log(f"validating {len(entries)} artifact(s) in {folder}")
    data = _dataset(args)
    out_dir = Path(args.report_dir) if args.report_dir else folder
    result = evaluate(entries, data, latency=latency, reference=args.reference, threads=args.threads,
                      batch=args.batch, root=out_dir, log=_log)
    return _finish(result, data, gates, out_dir, [], started)


def cmd_export(args: argparse.Namespace) -> int:
    from edge3dfa.converters import CALIBRATED, FORMATS, convert, format_module, load_source
    from edge3dfa.manifest import manifest_path
    from edge3dfa.validation.harness import Entry, Reference, evaluate

    started = time.perf_counter()
    gates, latency = _gates(args), _latency(args)
    if args.nme_budget is not None and not (args.gates or args.no_gates or args.max_delta_nme is not None
                                            or args.max_delta_nme_bin is not None):
        from edge3dfa.validation.gates import Gates, Limits

        budget = Limits(max_delta_nme=args.nme_budget, max_delta_nme_bin=2 * args.nme_budget)
        gates = Gates(gates.default, (*gates.precision, *((p, budget) for p in sorted(CALIBRATED))), gates.format)
    formats = args.to or list(FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise Edge3dfaError(f"unknown format {unknown[0]!r}; known: {', '.join(FORMATS)}")
    skipped: list[dict[str, str]] = []
    plan: list[tuple[str, Any, list[str]]] = []
    for fmt in formats:
        try:
            mod = format_module(fmt)
        except Edge3dfaError as e:  # converter or its extra not installed
            skipped.append({"what": fmt, "reason": str(e)})
            _log(f"skipping {fmt}: {e}")
            continue
        offered = list(mod.PRECISIONS)
        default = list(getattr(mod, "DEFAULT_PRECISIONS", offered))  # a format may keep its lossiest ones opt-in
        wanted = [p for p in args.precision if p in offered] if args.precision else default
        for p in (args.precision or []):
            if p not in offered:
                skipped.append({"what": f"{fmt} {p}", "reason": f"{fmt} offers {', '.join(offered)}"})
                _log(f"skipping {fmt} {p}: {fmt} offers {', '.join(offered)}")
        if wanted:
            plan.append((fmt, mod, wanted))
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
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                _log(f"conversion {fmt} {prec} failed: {type(e).__name__}: {msg}")
                failed_rows.append({"what": f"{fmt} {prec}", "reason": f"conversion failed: {type(e).__name__}: {msg}"})
                continue
            entries += [Entry(a.path, a.manifest, manifest_path(a.path)) for a in arts]
    ref = Reference(Path(src.path), src.sha256, src.name, None, module=src.model)
    report_dir = Path(args.report_dir) if args.report_dir else out_dir
    result = evaluate(entries, data, latency=latency, reference=ref, threads=args.threads, batch=args.batch,
                      root=report_dir, log=_log)
    for f in failed_rows:
        result["targets"].append({"key": f["what"], "role": "artifact", "status": "failed", "reason": f["reason"],
                                  "model": src.name, "format": f["what"].split()[0], "precision": f["what"].split()[1],
                                  "runtime": "-", "artifact": None, "manifest": None, "size_bytes": 0,
                                  "source_sha256": src.sha256, "nme": None, "delta_vs_reference": None,
                                  "delta_vs_fp32": None, "parity": None, "latency": [], "per_face": None})
    return _finish(result, data, gates, report_dir, skipped, started)
