"""Where the default absolute gates (validation.gates CEILING_*) come from: NME of garbage and trained models.

For every evaluation setting ``validate`` offers (crops / pipeline mode x original / re-annotated ground truth),
prints balanced NME, per-bin NME and failure rate (NME > 10%) on AFLW2000-3D of:

- degenerate models that ignore their input: the mean face drawn in every crop (all-zero normalised params,
  i.e. upstream's param_mean), an untrained (randomly initialised) mb05 and MobileNet-V3, and the best a
  constant can do: the ground truth's own average landmarks in crop coordinates drawn in every crop (an
  oracle: it peeks at the answers it is scored on);
- legitimate models: mb05 (the upstream checkpoint) and the distilled MobileNet-V3-small fixture (the worst
  trained model here: 4.77 balanced against 4.38 for the large fixture; assets fixtures/README.md).

A ceiling must sit above every legitimate model in every setting and below every degenerate one.

Usage: python benchmarks/gate_limits.py [--samples all] [--modes crops,pipeline]
"""

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.datasets import load_crops, load_pipeline
from edge3dfa.datasets.aflw2000_3d import GROUND_TRUTH
from edge3dfa.errors import Edge3dfaError
from edge3dfa.measure import metrics


def _models() -> list[tuple[str, object]]:
    """(name, predict function [N,3,120,120] -> [N,62]) of every model measured."""
    from edge3dfa.models import build_model
    from edge3dfa.models.checkpoint import randomize_
    from edge3dfa.target import open_target
    from edge3dfa.targets.torch import TorchTarget

    def zeros(x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 62), np.float32)

    out = [("degenerate: mean face (params 0)", zeros)]
    for name in ("mb05", "mbv3_05"):
        model = randomize_(build_model(name), seed=0).eval()
        out.append((f"degenerate: untrained {name}", TorchTarget(None, threads=1, model=model).predict))
    out.append(("mb05 (upstream checkpoint)", open_target("mb05", threads=1).predict))
    out.append(("mbv3_05_distilled (fixture)", open_target(assets.fetch("mbv3_05_distilled"), threads=1).predict))
    return out


def _oracle_constant(data) -> np.ndarray:  # noqa: ANN001
    """The set's mean ground-truth landmarks in crop coordinates (inverse of runtime.to_image), in every crop."""
    size = runtime.INPUT_SIZE
    roi = data.roi_boxes.astype(np.float64)
    sx, sy, ex, ey = (roi[:, i, None] for i in range(4))
    x = (data.gt[:, 0] - sx) / ((ex - sx) / size) + 1
    y = size - (data.gt[:, 1] - sy) / ((ey - sy) / size)
    mean = np.stack([x.mean(0), y.mean(0), np.zeros(x.shape[1])])[None].repeat(len(data), 0)
    return runtime.to_image(mean, data.roi_boxes)[:, :2]


def _line(setting: str, name: str, s: dict) -> str:
    return (f"{setting:32s} {name[:40]:40s} " + " ".join(f"{v['mean']:8.2f}" for v in s["bins"].values())
            + f" {s['balanced']:9.2f} {s['failure10']:9.1%}")


def _sets(mode: str, samples: str) -> list:
    """The evaluation set of ``mode`` under every ground truth (detection runs once)."""
    if mode == "crops":
        base = load_crops(samples)
    else:
        from edge3dfa.runtime.detect import FaceBoxesDetector
        from edge3dfa.target import open_target

        net = open_target(assets.fetch("faceboxes"), threads=1, arch="faceboxes")
        base = load_pipeline(FaceBoxesDetector.of_target(net), samples)
    out = [base]
    for gt_name in GROUND_TRUTH:
        if gt_name != base.ground_truth:
            gt = np.load(assets.fetch(GROUND_TRUTH[gt_name])).astype(np.float32)[:, :2]
            out.append(replace(base, ground_truth=gt_name, gt=gt[base.index]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="all", help="AFLW2000-3D faces (default: all)")
    ap.add_argument("--modes", default="crops,pipeline", help="evaluation modes (default: crops,pipeline)")
    args = ap.parse_args()
    models = _models()
    print(f"{'setting':32s} {'model':40s} " + " ".join(f"{b:>8s}" for b in metrics.BIN_LABELS)
          + f" {'balanced':>9s} {'fail>10%':>9s}")
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        sets = _sets(mode, args.samples)
        print(f"# {mode}: {len(sets[0])} faces scored, {len(sets[0].missed)} missed by the detector, "
              f"loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for data in sets:
            s = metrics.summarize(metrics.nme(_oracle_constant(data), data.gt), data.yaw)
            print(_line(f"{mode}, {data.ground_truth} GT", "degenerate: oracle constant face", s), flush=True)
        for name, predict in models:
            params = np.concatenate([predict(sets[0].inputs[i:i + 64]) for i in range(0, len(sets[0]), 64)])
            for data in sets:
                s = metrics.summarize(metrics.nme(runtime.landmarks(params, data.roi_boxes), data.gt), data.yaw)
                print(_line(f"{mode}, {data.ground_truth} GT", name, s), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Edge3dfaError as e:
        sys.exit(f"gate_limits: error: {e}")
