"""Full AFLW2000-3D (all 2000 crops, 3DDFA protocol) for mb05 on PyTorch and any artifacts given, with timing.

Prints NME per |yaw| bin, balanced and plain mean next to published figures, and how long each full
evaluation took (predict at batch 64 + landmarks + NME), with its ratio to PyTorch measured in the same run.

Usage: python benchmarks/aflw2000_full.py [ARTIFACT_OR_FOLDER ...] [--threads N] [--ground-truth reannotated]
"""

import argparse
import sys
import time
from pathlib import Path

from edge3dfa import runtime
from edge3dfa.datasets import load_crops
from edge3dfa.errors import Edge3dfaError
from edge3dfa.manifest import Manifest, manifest_path
from edge3dfa.measure import metrics
from edge3dfa.target import open_target
from edge3dfa.validation.harness import Entry, _precision_rank, discover, predict_all

# Published figures, original ground truth, |yaw| split 1312/383/305. (bins, balanced, plain mean)
PUBLISHED = [  # (label, per-bin, balanced, plain mean); sources in the notes printed below the table
    ("published: mb05 community re-evaluation [1]", (2.93, 3.67, 4.79), 3.80, 3.35),
    ("published: released V2 model, v1 script [2]", (2.735, 3.477, 4.543), 3.585, None),
    ("published: 3DDFA_V2 paper, MobileNet-V1 [3]", (None, None, None), 3.51, None),
]
NOTES = """[1] mb05_120x120.pth, 3DDFA v1 protocol: assets PROVENANCE.md; 3.80 also in cleardusk/3DDFA_V2 issue #20
[2] cleardusk/3DDFA_V2 issue #28 (model not named, likely the default mb1)
[3] ECCV 2020 paper headline, MobileNet-V1 x1.0 (M+R+S); per-bin values not verified here"""


def _entries(paths: list[str]) -> list[Entry]:
    out = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() != ".mlpackage":
            out += discover(p)
        else:
            m = manifest_path(p)
            out.append(Entry(Manifest.read(m).check_artifact(m), Manifest.read(m), m))
    return sorted(out, key=lambda e: (e.manifest.format, _precision_rank(e.manifest.precision), str(e.path)))


def _fmt(x: float | None, spec: str = "6.2f") -> str:
    return format(x, spec) if x is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="*", help="artifact files (with manifests) or folders of them")
    ap.add_argument("--model", default="mb05", help="PyTorch reference (zoo name or checkpoint; default: mb05)")
    ap.add_argument("--threads", type=int, default=1, help="threads per runtime (default: 1, as in validate)")
    ap.add_argument("--ground-truth", choices=("original", "reannotated"), default="original")
    args = ap.parse_args()

    t0 = time.perf_counter()
    data = load_crops("all", args.ground_truth)
    print(f"loaded {len(data)} crops in {time.perf_counter() - t0:.1f} s; {args.threads} thread(s), batch 64; "
          "timings on a shared machine are noisy", file=sys.stderr)
    targets = [(f"{args.model} torch (reference)", lambda: open_target(args.model, threads=args.threads))]
    for e in _entries(args.artifacts):
        targets.append((f"{e.manifest.model} {e.manifest.format} {e.manifest.precision}",
                        lambda p=e.path: open_target(p, threads=args.threads)))

    labels = "  ".join(f"{b:>8s}" for b in metrics.BIN_LABELS)
    print(f"{'AFLW2000-3D (2000), ' + args.ground_truth + ' GT':46s} {labels}  balanced    mean   time s  vs torch")
    for name, bins, bal, mean in PUBLISHED:
        print(f"{name[:46]:46s} " + "  ".join(_fmt(b, "8.2f") for b in bins) + f"  {_fmt(bal, '8.2f')} {_fmt(mean)}")
    base = None
    for name, opener in targets:
        target = opener()
        target.predict(data.inputs[:64])  # warm-up: first-call allocation and graph set-up are not evaluation
        t = time.perf_counter()
        params = predict_all(target, data.inputs)
        s = metrics.summarize(metrics.nme(runtime.landmarks(params, data.roi_boxes), data.gt), data.yaw)
        took = time.perf_counter() - t
        base = base or took
        print(f"{name[:46]:46s} " + "  ".join(f"{v['mean']:8.3f}" for v in s["bins"].values())
              + f"  {s['balanced']:8.3f} {s['mean']:7.3f} {took:8.1f} {took / base:8.2f}x")
    print(NOTES)


if __name__ == "__main__":
    try:
        main()
    except Edge3dfaError as e:
        sys.exit(f"aflw2000_full: error: {e}")
