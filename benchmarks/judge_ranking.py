"""Which judge ranks int8 artifacts the way AFLW2000-3D does: held-out ground-truth ΔNME, or departure from fp32?

Builds several int8 artifacts of one model and format that differ slightly (one calibration, different layers kept
float; and all int8 calibrated on fewer crops, ``--calib-counts``), then scores each under several judges:

- ``old``: balanced ΔNME vs fp32 on the held-out AFLW crops' ground truth (what --nme-budget judges on; every
  crop calibration leaves, 256 with the default 256 calibration crops);
- ``gt_mirror`` / ``mirror_only``: the same with each face's mirrored crop and mirrored ground truth averaged in
  / alone (``mirrored``; a check that the mirroring is right: fp32's NME on the mirrored set is printed beside
  the crops', and must be about the same);
- ``departure`` / ``departure_no_flip``: balanced departure from fp32 (per face, NME of the int8 landmarks
  against the fp32 model's own, ``measure.parity.departure``), crop and mirror averaged / crops only; no ground
  truth, so nothing of AFLW's annotation noise; ``param_departure``: mean |params - fp32 params| per face;
  ``aflw_departure``: the departure on AFLW2000-3D itself;
- **truth**: balanced ΔNME vs fp32 on the AFLW2000-3D crops (never seen by any judge).

It prints every figure with its paired bootstrap 95 % interval (``measure.bootstrap``), each judge's Spearman
rank correlation with the truth, and, over every pair of artifacts whose AFLW2000-3D ΔNME differ by at least
``--gap`` (and whose paired AFLW2000-3D difference is resolved: its interval excludes 0), how often each judge picks
the better one (and among those closer than 2 x gap), whether the held-out crops resolve each pair, then the
machine. The figures in README "How sure the judge is" come from (2-core AMD EPYC, 1.5-3.5 minutes each)::

    python benchmarks/judge_ranking.py --model mb05 --format tflite --variants 16 --calib-counts 32,64,128 --aflw all
    python benchmarks/judge_ranking.py --model mb05 --format onnx --variants 16 --calib-counts 32,64,128 --aflw all
    python benchmarks/judge_ranking.py --model mbv3 --format tflite --variants 12 --calib-counts 32,64,128 --aflw all

A quick look: ``--variants 4 --calib-counts 64 --aflw 200`` (under a minute).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge3dfa import assets, runtime
from edge3dfa.datasets import load_crops
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import heldout_for
from edge3dfa.fileio import write_json
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.parity import departure
from edge3dfa.measure.predict import predict_all
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target
from edge3dfa.targets.torch import TorchTarget

MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}


#: AFLW's 21 points mirrored: brows 0-5, eyes 6-11, nose 12-16 (14 the tip), mouth 17-19, chin 20
#: (``metrics.AFLW21_FROM_68`` gives each point's 68-point definition)
MIRROR_AFLW21 = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 16, 15, 14, 13, 12, 19, 18, 17, 20)


def mirrored(data):  # noqa: ANN001, ANN201 - an EvalSet
    """``data`` (21-point ground truth) with every crop mirrored and its ground truth with it: points swap sides
    (``MIRROR_AFLW21``) and x is mirrored within the crop's roi box, pixel centres onto pixel centres (crop pixel
    j onto 119 - j); invisible points (-1) stay invisible. The same faces, so scores on it pair with ``data``'s."""
    if data.gt.shape[1:] != (2, 21):
        raise ValueError(f"mirrored() needs AFLW 21-point ground truth, got {data.gt.shape}")
    gt = data.gt[:, :, list(MIRROR_AFLW21)].copy()
    x0, x1 = data.roi_boxes[:, 0:1], data.roi_boxes[:, 2:3]
    pixel = (x1 - x0) / data.inputs.shape[-1]
    visible = (gt[:, 0] != -1) & (gt[:, 1] != -1)
    gt[:, 0] = np.where(visible, x0 + x1 - pixel - gt[:, 0], -1)
    gt[:, 1] = np.where(visible, gt[:, 1], -1)
    return replace(data, name=f"{data.name}, mirrored", inputs=np.ascontiguousarray(data.inputs[..., ::-1]), gt=gt,
                   subset=f"{data.subset}, mirrored")


def variants(layers: list[str], count: int) -> dict[str, list[str]]:
    """``count`` keep-float choices: all int8, then single layers evenly spaced through the graph, then the first
    three and the last three layers together."""
    out: dict[str, list[str]] = {"all int8": []}
    singles = max(count - 3, 1)
    for i in np.unique(np.linspace(0, len(layers) - 1, singles).round().astype(int)):
        out[f"{layers[i]} float"] = [layers[i]]
    out["first 3 float"], out["last 3 float"] = layers[:3], layers[-3:]
    return dict(itertools.islice(out.items(), count))


def gt_nme(params: np.ndarray, data, aflw21: bool) -> np.ndarray:  # noqa: ANN001
    pts = runtime.landmarks(params, data.roi_boxes)
    return metrics.nme_aflw21(pts, data.gt) if aflw21 else metrics.nme(pts, data.gt)


def balanced_departure(values: np.ndarray, yaw: np.ndarray) -> dict:
    s = metrics.summarize(values, yaw)
    return {"balanced": s["balanced"], "ci": bootstrap.interval(values, yaw)["balanced"]}


def score(params: dict[str, np.ndarray], ref: dict[str, np.ndarray], held, mirror, aflw) -> dict:  # noqa: ANN001
    """One artifact's figures under every judge, the truth, and the per-face AFLW2000-3D NME (for pairs)."""
    held_nme, aflw_nme = gt_nme(params["held"], held, True), gt_nme(params["aflw"], aflw, False)
    mirror_nme = gt_nme(params["held_flip"], mirror, True)
    dep = departure(ref["held"], params["held"])
    dep_flip = departure(ref["held_flip"], params["held_flip"])
    return {"old": bootstrap.paired_delta(held_nme, ref["held_nme"], held.yaw),
            "gt_mirror": bootstrap.paired_delta((held_nme + mirror_nme) / 2, ref["held_both_nme"], held.yaw),
            "mirror_only": bootstrap.paired_delta(mirror_nme, ref["mirror_nme"], held.yaw),
            "departure": balanced_departure((dep + dep_flip) / 2, held.yaw),
            "departure_no_flip": balanced_departure(dep, held.yaw),
            "truth": bootstrap.paired_delta(aflw_nme, ref["aflw_nme"], aflw.yaw),
            "param_departure": balanced_departure(np.abs(params["held"] - ref["held"]).mean(axis=1), held.yaw),
            "aflw_departure": balanced_departure(departure(ref["aflw"], params["aflw"]), aflw.yaw),
            "aflw_nme": aflw_nme, "held_nme": held_nme}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pairs(rows: dict[str, dict], judge: str, gap: float, yaw: np.ndarray, held_yaw: np.ndarray) -> dict:
    """Over pairs whose AFLW2000-3D ΔNME differ by >= gap and whose paired difference interval excludes 0: how
    often ``judge`` (lower is better) picks the one with the lower AFLW2000-3D ΔNME; each pair listed with the
    held-out paired difference and its interval (does the held-out judge resolve it?)."""
    agree, total, listed = 0, 0, []
    for (na, a), (nb, b) in itertools.combinations(rows.items(), 2):
        diff = a["truth"]["balanced"] - b["truth"]["balanced"]
        ci = bootstrap.interval(a["aflw_nme"] - b["aflw_nme"], yaw)["balanced"]
        if abs(diff) < gap or ci[0] <= 0 <= ci[1]:
            continue
        pick_a = a[judge]["balanced"] < b[judge]["balanced"]
        ok = pick_a == (diff < 0)
        agree, total = agree + ok, total + 1
        held = bootstrap.paired_delta(a["held_nme"], b["held_nme"], held_yaw)
        listed.append({"a": na, "b": nb, "aflw_diff": diff, "aflw_diff_ci": ci, "agrees": bool(ok),
                       "heldout_diff": held})
    return {"agree": agree, "pairs": total, "listed": listed}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPU threads, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mb05", choices=sorted(MODELS))
    ap.add_argument("--format", default="tflite", choices=("tflite", "onnx"))
    ap.add_argument("--variants", type=int, default=8, help="int8 artifacts to build (>= 2)")
    ap.add_argument("--aflw", default="all", help="AFLW2000-3D crops for the truth: a count (evenly spaced) or all")
    ap.add_argument("--calib-counts", default="64,128",
                    help="also all-int8 artifacts calibrated on the first N of the 256 calibration crops (comma list)")
    ap.add_argument("--gap", type=float, default=0.01, help="AFLW2000-3D ΔNME difference a pair must have")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    from edge3dfa.converters import get_format

    t0 = time.perf_counter()
    key = MODELS[args.model]
    src = Checkpoint.open(key if key == "mb05" else assets.fetch(key))
    calibration = load_calibration(None, count=256)
    held, aflw = heldout_for(calibration), load_crops(args.aflw)
    mirror = mirrored(held)
    torch_t = TorchTarget(src.path, threads=1, model=src.load())
    inputs = {"held": held.inputs, "held_flip": mirror.inputs, "aflw": aflw.inputs}
    ref = {k: predict_all(torch_t, x) for k, x in inputs.items()}
    ref.update(held_nme=gt_nme(ref["held"], held, True), mirror_nme=gt_nme(ref["held_flip"], mirror, True),
               aflw_nme=gt_nme(ref["aflw"], aflw, False))
    ref["held_both_nme"] = (ref["held_nme"] + ref["mirror_nme"]) / 2
    print(f"{args.model} {args.format}: {len(held)} held-out crops (+{len(held)} mirrored), {len(aflw)} AFLW2000-3D "
          f"crops; fp32 held-out NME {metrics.summarize(ref['held_nme'], held.yaw)['balanced']:.3f}, mirrored "
          f"{metrics.summarize(ref['mirror_nme'], held.yaw)['balanced']:.3f}; ready after "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    fmt = get_format(args.format)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        builder = fmt.int8_builder(src, fmt.Options(), calibration, Path(tmp))
        builds = [(name, builder, keep) for name, keep in variants(list(builder.layers), args.variants).items()]
        for n in [int(c) for c in args.calib_counts.split(",") if c]:  # fewer crops: still none held out
            sub = Path(tmp) / f"calib{n}"
            sub.mkdir()
            builds.append((f"all int8, calibrated on {n}", fmt.int8_builder(src, fmt.Options(), calibration.split(n)[0],
                                                                             sub), []))
        for i, (name, b, keep) in enumerate(builds):
            path = Path(tmp) / f"v{i}{fmt.suffix}"
            b.export(path, keep)
            target = open_target(path, threads=1)
            rows[name] = score({k: predict_all(target, x) for k, x in inputs.items()}, ref, held, mirror, aflw)
            r = rows[name]
            print(f"  {name:28s} old {bootstrap.text(r['old'])}  +mirror {bootstrap.text(r['gt_mirror'])}  "
                  f"departure {r['departure']['balanced']:.4f}  "
                  f"truth {bootstrap.text(r['truth'])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(rows, args, aflw.yaw, held, aflw, time.perf_counter() - t0)


def report(rows: dict[str, dict], args: argparse.Namespace, yaw: np.ndarray, held, aflw, seconds: float) -> None:  # noqa: ANN001
    truth = [r["truth"]["balanced"] for r in rows.values()]
    print(f"\n| artifact | old: held-out ΔNME ({len(held)} faces) | held-out ΔNME, crop + mirrored | departure "
          f"(crop + mirrored) | departure, crops only | AFLW2000-3D ΔNME ({len(aflw)}) | AFLW2000-3D departure |")
    print("|---|---|---|---|---|---|---|")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["truth"]["balanced"]):
        n, n1, a = r["departure"], r["departure_no_flip"], r["aflw_departure"]
        print(f"| {name} | {bootstrap.text(r['old'])} | {bootstrap.text(r['gt_mirror'])} | {n['balanced']:.4f} "
              f"[{n['ci'][0]:.4f}, {n['ci'][1]:.4f}] | {n1['balanced']:.4f} | {bootstrap.text(r['truth'])} | "
              f"{a['balanced']:.4f} |")
    summary = {}
    for judge in ("old", "gt_mirror", "mirror_only", "departure", "departure_no_flip", "param_departure",
                  "aflw_departure"):
        rho = spearman([r[judge]["balanced"] for r in rows.values()], truth)
        p = pairs(rows, judge, args.gap, yaw, held.yaw)
        near = [q for q in p["listed"] if abs(q["aflw_diff"]) < 2 * args.gap]
        summary[judge] = {"spearman_vs_aflw2000": rho, **{k: p[k] for k in ("agree", "pairs")},
                          "near": [sum(q["agrees"] for q in near), len(near)]}
        print(f"{judge:17s} Spearman vs AFLW2000-3D ΔNME {rho:+.2f}; picks the better of {p['agree']}/{p['pairs']} "
              f"pairs that differ by >= {args.gap:g} on AFLW2000-3D (paired difference resolved), "
              f"{sum(q['agrees'] for q in near)}/{len(near)} of those within {2 * args.gap:g}")
    listed = pairs(rows, "old", args.gap, yaw, held.yaw)["listed"]
    resolved = sum(not (p["heldout_diff"]["ci"]["balanced"][0] <= 0 <= p["heldout_diff"]["ci"]["balanced"][1])
                   for p in listed)
    print(f"the held-out crops resolve {resolved} of these {len(listed)} pairs (paired held-out difference interval "
          "excludes 0):")
    summary["heldout_resolves"] = {"resolved": resolved, "pairs": len(listed)}
    for p in listed:
        verdicts = []
        for judge in ("old", "gt_mirror", "departure"):
            pick_a = rows[p["a"]][judge]["balanced"] < rows[p["b"]][judge]["balanced"]
            verdicts.append(f"{judge} {'right' if pick_a == (p['aflw_diff'] < 0) else 'WRONG'}")
        print(f"  {p['a']} vs {p['b']}: AFLW2000-3D diff {p['aflw_diff']:+.4f} [{p['aflw_diff_ci'][0]:+.4f}, "
              f"{p['aflw_diff_ci'][1]:+.4f}], held-out {bootstrap.text(p['heldout_diff'], nd=4)}; "
              + ", ".join(verdicts))
    print(f"machine: {machine()}; {seconds:.0f} s")
    if args.out:
        keep = {n: {k: v for k, v in r.items() if k not in ("aflw_nme", "held_nme")} for n, r in rows.items()}
        write_json(Path(args.out), {"args": vars(args), "rows": keep, "summary": summary, "machine": machine(),
                                    "seconds": seconds})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
