"""``edge3dfa validate FOLDER``: accuracy, parity and latency reports, and the evaluation options ``export``
(``edge3dfa.workflows.export``) shares.

Both commands end with one verdict (``edge3dfa.validation.gates``), the first line of the terminal summary and of
report.md/html. Exit codes: 0 PASSED; 1 FAILED (a gate failed, or an artifact could not be converted, opened, run
or scored) or NOT VERIFIED (something was not checked: a target skipped with --skip-unavailable, --no-gates, a
gate that could not be computed); 2 bad input, found before any work where it can be (export checks its whole
plan -- formats, precisions, budget -- before converting anything).
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path
from typing import Any

from edge3dfa.errors import Edge3dfaError
from edge3dfa.progress import Progress
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


def add_eval_options(p: argparse.ArgumentParser) -> None:
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
    add_eval_options(p)
    p.set_defaults(func=cmd_validate)


# ---------------------------------------------------------------- shared steps

def log(msg: str) -> None:
    """A line on stderr (above the progress bar while ``export`` shows one: ``edge3dfa.progress.echo``)."""
    from edge3dfa.progress import echo

    echo(msg)


_LIMIT_OPTIONS = ("max_delta_nme", "max_delta_nme_bin", "max_abs_delta_nme", "max_nme", "max_param_err",
                  "max_landmark_px", "max_failure_rate")


def gates_of(args: argparse.Namespace):  # noqa: ANN202
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


def check_threads_of(args: argparse.Namespace) -> None:
    """Thread counts before any work: one check for every runtime (``edge3dfa.target.check_threads``)."""
    from edge3dfa.target import check_threads

    check_threads(args.threads, "--threads")
    for n in args.latency_threads or ():
        check_threads(n, "--latency-threads")


def latency_of(args: argparse.Namespace):  # noqa: ANN202
    from edge3dfa.measure.timing import LatencyConfig

    if args.latency_runs < 0 or args.latency_warmup < 0 or args.latency_budget < 0:
        raise Edge3dfaError("--latency-runs, --latency-warmup and --latency-budget must be >= 0")
    kw = {"threads": args.latency_threads} if args.latency_threads else {}
    return LatencyConfig(batch_sizes=args.latency_batch, warmup=args.latency_warmup, runs=args.latency_runs,
                         budget_s=args.latency_budget or None, **kw)


def dataset_of(args: argparse.Namespace):  # noqa: ANN202
    from edge3dfa.datasets import load_crops, load_pipeline

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
    detector = FaceBoxesDetector.of_target(net)  # upstream's thresholds and NMS; a fixed-size artifact's size
    return load_pipeline(detector, args.samples, args.ground_truth, args.images_dir)


def finish(result: dict, data: Any, gates: Any, out_dir: Path, not_attempted: list[dict], started: float,
            reference: str) -> int:
    from edge3dfa.validation import report

    rep = report.build(result, data, gates, not_attempted, reference=reference)
    paths = report.write(rep, out_dir)
    report.print_summary(rep, folder=out_dir)
    log(f"report: {paths['html']} (+ report.md, report.json) in {time.perf_counter() - started:.0f} s")
    log(report.verdict_line(rep))
    return 0 if rep["verdict"] == "PASSED" else 1


# ---------------------------------------------------------------- commands

def cmd_validate(args: argparse.Namespace) -> int:
    from edge3dfa.validation.harness import NO_REFERENCE, discover, evaluate, is_regressor

    started = time.perf_counter()
    check_threads_of(args)
    folder = Path(args.folder)
    entries = discover(folder, verify=not args.no_verify)
    if args.no_verify:
        log(f"edge3dfa: warning: --no-verify: the artifacts in {folder} are evaluated without checking them "
             "against their manifests")
    gates, latency = gates_of(args), latency_of(args)
    log(f"validating {len(entries)} artifact(s) in {folder}")
    data = dataset_of(args)
    out_dir = Path(args.report_dir) if args.report_dir else folder
    alone = (args.reference or "").lower() == NO_REFERENCE
    steps = [s for s in ("evaluate", "latency") if latency.enabled or s != "latency"]
    scored = [e for e in entries if is_regressor(e.manifest)]  # detectors are listed, not scored
    bar = Progress([f"{e.manifest.format} {e.manifest.precision}" for e in scored], steps=steps,
                   reference_steps=() if alone else steps, title="validate", started=started)
    with bar:  # artifact i of n, step, elapsed, ETA, as in export (edge3dfa.progress)
        result = evaluate(entries, data, latency=latency, reference=args.reference, threads=args.threads,
                          batch=args.batch, root=out_dir, skip_unavailable=args.skip_unavailable, log=log)
    result["timings"] = bar.timings()
    return finish(result, data, gates, out_dir, [], started, "none" if alone else "pytorch")
