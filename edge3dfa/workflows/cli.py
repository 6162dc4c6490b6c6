"""``edge3dfa convert``: checkpoint -> artifacts + manifests, with a parity table at the end; ``edge3dfa export``
is registered from ``workflows.export``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from edge3dfa.workflows.export import register_export

__all__ = ["register_convert", "register_export"]


def register_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to every format asked for, with manifests")
    p.add_argument("--model", default="mb05", help="zoo name, e.g. mb05 or faceboxes (default: mb05)")
    p.add_argument("--checkpoint", help="3DDFA_V2 checkpoint to convert instead of the zoo's weights")
    p.add_argument("--arch", help="zoo name giving the architecture of --checkpoint (default: inferred)")
    p.add_argument("--to", default="onnx", help="formats, comma separated (default: onnx; --list-options shows "
                                                "the installed ones)")
    p.add_argument("--precision", default="fp32", help="precisions, comma separated (e.g. fp32,int8)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/NAME/FORMAT/ (default: out)")
    add_conversion_options(p)
    p.add_argument("--bundle", action="store_true",
                   help="write phone bundles instead of params artifacts: uint8 120x120 crop in, landmarks (crop px), "
                        "pose (degrees) and params out, the contract in the file and the manifest, as "
                        "OUT/NAME/FORMAT/NAME_PRECISION_bundle.SUFFIX (README 'On the phone'); the channel order with "
                        "--option bundle.channels=bgr|rgb (default bgr); a format or precision that does not bundle "
                        "is refused before any work; not with --nme-budget (the search builds params artifacts)")
    p.add_argument("--threads", type=int, help="threads for parity runs")
    p.add_argument("--allow-over-budget", action="store_true",
                   help="with --nme-budget: exit 0 even when no int8 artifact meets the budget (the best one found "
                        "is written either way, with quantization.met false in its manifest; default: exit 1)")
    p.set_defaults(func=run_convert)


def add_conversion_options(p: argparse.ArgumentParser) -> None:
    """What ``convert`` and ``export`` share: calibration, the budget, format options."""
    p.add_argument("--calib-dir", help="folder of 120x120 face crops for int8 (default: the disjoint AFLW set)")
    p.add_argument("--calib-count", default="256", help="calibration crops to use (default: 256)")
    p.add_argument("--nme-budget", metavar="DELTA",
                   help="int8: the fastest artifact (int8 variant or mixed precision) whose NME on held-out AFLW "
                        "crops stays within DELTA of fp32 (balanced; 2x DELTA per yaw bin), e.g. 0.05; 'within' means "
                        "the upper end of the paired bootstrap 95%% interval (a DELTA below what the held-out crops "
                        "resolve is warned about)")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --nme-budget: also rank every layer by the NME it costs (table and plot in the report)")
    p.add_argument("--option", action="append", default=[], metavar="[FORMAT.]KEY=VALUE",
                   help="format option (repeatable), e.g. onnx.head=landmarks; the bare KEY=VALUE when converting "
                        "to one format; bundle.KEY=VALUE for --bundle (bundle.channels=rgb)")
    p.add_argument("--list-options", action="store_true",
                   help="list the options (and defaults) of the formats in --to, then exit")


def parse_options(items: list[str]) -> dict[str, str]:
    """``["onnx.opset=18", "exclude=a,b"]`` -> ``{"onnx.opset": "18", "exclude": "a,b"}``: values stay strings,
    each format's Options class parses them strictly."""
    from edge3dfa.errors import Edge3dfaError

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise Edge3dfaError(f"--option takes [FORMAT.]KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out


#: the prefix of the --option keys that are the bundle's (``edge3dfa.bundle.BundleOptions``), not a format's
BUNDLE_PREFIX = "bundle."


def bundle_of(args: argparse.Namespace, options: dict[str, str]) -> Any:
    """``--bundle`` and the ``bundle.KEY=VALUE`` options (taken out of ``options``) as a ``BundleOptions``; None
    without --bundle. A bundle option without --bundle, or a bad one, is an error before any work."""
    from edge3dfa.bundle import BundleOptions
    from edge3dfa.errors import Edge3dfaError

    given = {k.removeprefix(BUNDLE_PREFIX): options.pop(k) for k in list(options) if k.startswith(BUNDLE_PREFIX)}
    if not getattr(args, "bundle", False):
        if given:
            raise Edge3dfaError(f"--option {BUNDLE_PREFIX}{next(iter(given))}: bundle options need --bundle")
        return None
    return BundleOptions.parse(given)


def budget_of(args: argparse.Namespace) -> Any:
    """The --nme-budget / --sensitivity pair as a Budget (None without --nme-budget)."""
    from edge3dfa.errors import Edge3dfaError
    from edge3dfa.workflows.budget import Budget

    if args.nme_budget is None:
        if args.sensitivity:
            raise Edge3dfaError("--sensitivity ranks layers during an --nme-budget search: give --nme-budget too")
        return None
    return Budget.parse({"nme": args.nme_budget, "sensitivity": args.sensitivity})


def calibration_of(args: argparse.Namespace) -> Any:
    from edge3dfa.converters import Calibration

    return Calibration.parse({"folder": args.calib_dir, "count": args.calib_count})


def check_out(out: str) -> None:
    """Refuse an ``--out`` the converters cannot use, before any work: a path that is not UTF-8 (bytes a locale
    cannot decode, e.g. ``$'out_\\xff'``) reaches the frameworks as text they cannot encode (ONNX's checker failed
    with an internal error), and a folder that cannot be created (a name over 255 bytes, a read-only disk) failed
    every conversion, then the report, minutes later (``OSError``: exit 2)."""
    from edge3dfa.errors import Edge3dfaError
    from edge3dfa.logs import printable

    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise Edge3dfaError(f"--out {printable(out)} is not a UTF-8 path, which the converters' frameworks take: "
                            "choose a folder whose name is UTF-8") from None
    path = Path(os.path.abspath(out))
    base = next(p for p in (path, *path.parents) if os.path.exists(p))  # created later: a plan error writes nothing
    name_max = os.pathconf(base, "PC_NAME_MAX") if base.is_dir() else 255
    too_long = [q for q in path.relative_to(base).parts if len(os.fsencode(q)) > name_max]
    if not base.is_dir() or too_long or (base != path and not os.access(base, os.W_OK)):  # to create in
        why = (f"{printable(base)} is not a folder" if not base.is_dir() else
               f"a name over {name_max} bytes ({printable(too_long[0])[:40]}...)" if too_long else
               f"{printable(base)} is not writable")
        raise Edge3dfaError(f"--out {printable(out)}: cannot create or write it: {why}")


def list_options(names: list[str]) -> int:
    from edge3dfa.bundle import BundleOptions
    from edge3dfa.converters import get_format

    for name in names:
        fmt = get_format(name)
        bundles = "builds phone bundles" if fmt.bundles else "no phone bundles"
        print(f"{name} ({fmt.suffix}; precisions {', '.join(fmt.precisions)}; {bundles}):")
        for key, kind, default, help_ in fmt.Options.describe():
            print(f"  {name}.{key}={default}  [{kind}]  {help_}")
    print("bundle (with --bundle, every format that builds phone bundles):")
    for key, kind, default, help_ in BundleOptions.describe():
        print(f"  {BUNDLE_PREFIX}{key}={default}  [{kind}]  {help_}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from edge3dfa.converters import plan_list
    from edge3dfa.models.checkpoint import Checkpoint
    from edge3dfa.workflows import convert, over_budget

    if args.list_options:
        return list_options(plan_list(args.to, "format"))
    check_out(args.out)
    options, calibration, budget = parse_options(args.option), calibration_of(args), budget_of(args)
    bundle = bundle_of(args, options)
    source = Checkpoint.open(args.checkpoint or args.model, args.arch if args.checkpoint else None)
    arts = convert(source, to=args.to, precision=args.precision, out_dir=args.out, options=options,
                   calibration=calibration, budget=budget, threads=args.threads, bundle=bundle)
    print_parity(arts)
    return _budget_verdict(over_budget(arts), args.allow_over_budget)


def print_parity(arts: list[Any]) -> None:
    detectors = [a for a in arts if any(k.startswith("photo ") for k in a.manifest.parity)]
    if detectors:
        print_detector_parity(detectors)
    arts = [a for a in arts if a not in detectors]
    if not arts:
        return
    print(f"{'artifact':44s} {'size':>9s} {'set':12s} {'param max':>10s} {'param mean':>10s} "
          f"{'lm max px':>10s} {'lm mean px':>10s}")
    for a in arts:
        m = a.manifest
        rows = [(k, v) for k, v in m.parity.items() if isinstance(v, dict)] or [("-", {})]
        for i, (name, r) in enumerate(rows):
            head = f"{str(a.path):44s} {m.size_bytes / 1e6:8.2f}M" if i == 0 else " " * 54
            print(f"{head} {name:12s} {r.get('param_max_abs', float('nan')):10.2e} "
                  f"{r.get('param_mean_abs', float('nan')):10.2e} {r.get('landmark_max_px', float('nan')):10.3f} "
                  f"{r.get('landmark_mean_px', float('nan')):10.3f}")
            if "bundle_landmark_mean_px" in r:  # a phone bundle's own outputs vs the executable spec
                print(f"{'':54s} {'':12s} bundle vs edge3dfa.runtime: landmarks mean "
                      f"{r['bundle_landmark_mean_px']:.2e} / max {r['bundle_landmark_max_px']:.2e} px, pose max "
                      f"{r.get('pose_max_deg', float('nan')):.2e} deg")


def print_detector_parity(arts: list[Any]) -> None:
    """A detector's parity (measure.parity.detector_parity) per photo: faces, box agreement, landmark change."""
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    print(f"{'artifact':44s} {'size':>9s} {'photo':14s} {'faces':>7s} {'min IoU':>9s} {'box px':>8s} "
          f"{'lm mean px':>10s} {'lm max px':>9s}")
    for a in arts:
        rows = [(k.removeprefix("photo "), v) for k, v in a.manifest.parity.items() if k.startswith("photo ")]
        for i, (name, r) in enumerate(rows):
            head = f"{str(a.path):44s} {a.manifest.size_bytes / 1e6:8.2f}M" if i == 0 else " " * 54
            faces = "=".join(map(str, r.get("faces") or [])) or "-"
            print(f"{head} {name:14s} {faces:>7s} {f(r.get('box_min_iou'), '9.6f')} {f(r.get('box_max_px'), '8.1e')} "
                  f"{f(r.get('landmark_mean_px'), '10.2e')} {f(r.get('landmark_max_px'), '9.2e')}")


def _budget_verdict(over: list[Any], allowed: bool) -> int:
    """Exit 1 when an --nme-budget search did not meet its budget, unless the user allowed it."""
    from edge3dfa.measure import bootstrap

    for a in over:
        q = a.manifest.quantization
        small = ((q.get("judge") or {}).get("warning") or "").rpartition("the smallest budget they resolve is ")[2]
        print(f"edge3dfa: {'warning' if allowed else 'error'}: {a.path} does not meet --nme-budget "
              f"{q['budget']['nme']:g}: held-out NME {bootstrap.text(q['delta'])} vs fp32 (the upper end of the 95% "
              f"interval must be within the budget; best found, written with quantization.met false"
              f"{'; the held-out crops resolve ' + small if small else ''})"
              f"{'' if allowed else '; --allow-over-budget accepts it'}", file=sys.stderr)
    return 1 if over and not allowed else 0
