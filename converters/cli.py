"""``edge3dfa convert``: checkpoint -> artifacts + manifests, with a parity table at the end."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to ONNX / TFLite / CoreML with manifests")
    p.add_argument("--model", default="mb05", help="zoo name, or 'faceboxes' (default: mb05)")
    p.add_argument("--checkpoint", help="3DDFA_V2 checkpoint to convert instead of the zoo's weights")
    p.add_argument("--arch", help="zoo name giving the architecture of --checkpoint (default: inferred)")
    p.add_argument("--to", default="onnx",
                   help="formats, comma separated: onnx,tflite,coreml,executorch (default: onnx)")
    p.add_argument("--precision", default="fp32", help="precisions, comma separated (e.g. fp32,int8)")
    p.add_argument("--out", default="out", help="output root; artifacts go to OUT/NAME/FORMAT/ (default: out)")
    p.add_argument("--calib-dir", help="folder of 120x120 face crops for int8 (default: the disjoint AFLW set)")
    p.add_argument("--calib-count", type=int, default=256, help="calibration crops to use (default: 256)")
    p.add_argument("--threads", type=int, help="threads for parity runs")
    p.add_argument("--nme-budget", type=float, metavar="DELTA",
                   help="int8 (CoreML: w8a8): the fastest artifact (int8 variant or mixed precision) whose NME on "
                        "held-out AFLW crops stays within DELTA of fp32 (balanced; 2x DELTA per yaw bin), e.g. 0.05")
    p.add_argument("--allow-over-budget", action="store_true",
                   help="with --nme-budget: exit 0 even when no int8 artifact meets the budget (the best one found "
                        "is written either way, with quantization.met false in its manifest; default: exit 1)")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --nme-budget: also rank every layer by the NME it costs (table and plot in the report)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="format option passed to the converter (repeatable), e.g. head=landmarks")
    p.set_defaults(func=run)


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def run(args: argparse.Namespace) -> int:
    from edge3dfa.converters import convert, over_budget
    from edge3dfa.errors import Edge3dfaError

    options = {}
    for item in args.option:
        if "=" not in item:
            raise Edge3dfaError(f"--option takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        options[k.replace("-", "_")] = _value(v)
    arts = convert(args.checkpoint or args.model, to=args.to, precision=args.precision, out_dir=args.out,
                   arch=args.arch if args.checkpoint else None, calibration=args.calib_dir,
                   calib_count=args.calib_count, threads=args.threads, nme_budget=args.nme_budget,
                   sensitivity=args.sensitivity, **options)
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
    return _budget_verdict(over_budget(arts), args.allow_over_budget)


def _budget_verdict(over: list[Any], allowed: bool) -> int:
    """Exit 1 when an --nme-budget search did not meet its budget, unless the user allowed it."""
    for a in over:
        q = a.manifest.quantization
        print(f"edge3dfa: {'warning' if allowed else 'error'}: {a.path} does not meet --nme-budget "
              f"{q['budget']['nme']:g}: held-out NME {q['delta']['balanced']:+.3f} vs fp32 (best found; written "
              f"with quantization.met false){'' if allowed else '; --allow-over-budget accepts it'}", file=sys.stderr)
    return 1 if over and not allowed else 0
