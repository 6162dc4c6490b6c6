"""Everything a Pi needs from one export (issue 19 part 3): the FaceBoxes detector converted beside the regressor,
judged in the report, named by the run command, and usable by ``run --detector`` and ``validate --mode pipeline``.

The cheap tests judge hand-made parity figures and check the plan and the wrappers without a framework. The slow
one exports mb05 to TFLite fp32 (the Pi's runtime) and checks the detector against PyTorch FaceBoxes run by the
test itself: boxes compared with an IoU written here, not the package's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge3dfa.validation.detectors import DetectorRow, judge, overall

# ---------------------------------------------------------------- judging a detector's parity (no framework)


def _photo(faces: tuple[int, int] = (2, 2), iou: float | None = 0.999999, crop_px: float | None = 1e-4) -> dict:
    """One photo's entry of a detector manifest's parity, as measure.parity.detector_parity writes it."""
    return {"loc_max_abs": 1e-5, "conf_max_abs": 1e-6, "blob": [480, 640], "faces": list(faces),
            "box_min_iou": iou, "box_max_px": None if iou is None else 1e-4,
            "landmark_mean_px": None if crop_px is None else crop_px, "landmark_max_px": crop_px,
            "landmark_max_crop_px": crop_px}


def _judged(*photos: dict, status: str = "ok") -> dict:
    parity = {f"photo p{i}": p for i, p in enumerate(photos)}
    return judge(DetectorRow(key="faceboxes/tflite/fp32", model="faceboxes", format="tflite", precision="fp32",
                             status=status, reason=None if status == "ok" else "conversion failed: boom",
                             artifact="../faceboxes/tflite/faceboxes_fp32.tflite", parity=parity))


@pytest.mark.parametrize(("photos", "status", "want"), [
    ([_photo(), _photo((3, 3))], "ok", "PASSED"),
    ([_photo(), _photo((3, 2))], "ok", "FAILED"),  # another number of faces on one photo
    ([_photo(), _photo(iou=0.9)], "ok", "FAILED"),  # a box moved
    ([_photo(iou=math.nan)], "ok", "FAILED"),  # NaN parity is never a pass
    ([_photo(), _photo(iou=math.nan)], "ok", "FAILED"),  # nor on a later photo (min() skipped it: PASSED)
    ([_photo(), _photo(crop_px=math.nan)], "ok", "FAILED"),
    ([_photo(crop_px=math.inf)], "ok", "FAILED"),
    ([_photo(crop_px=2.0)], "ok", "FAILED"),  # landmarks moved more than the lossless limit
    ([_photo(), _photo((0, 0), iou=None, crop_px=None)], "ok", "NOT VERIFIED"),  # no face: nothing compared
    ([_photo(crop_px=None)], "ok", "NOT VERIFIED"),  # no landmark figures (converted without a regressor)
    ([], "ok", "NOT VERIFIED"),  # no photo measured at all
    ([], "error", "FAILED"),  # the conversion failed
], ids=["same", "faces differ", "low iou", "nan iou", "nan iou 2nd photo", "nan landmarks 2nd photo",
        "inf landmarks", "landmarks moved", "no face", "no landmarks",
        "no photos", "conversion failed"])
def test_detector_verdict_from_its_parity(photos, status, want):
    d = _judged(*photos, status=status)
    assert d["verdict"] == want and d["passed"] == (want == "PASSED")
    # the report's verdict is never better than a detector's
    assert overall("PASSED", [d]) == want
    assert overall("FAILED", [d]) == "FAILED"


def test_a_failed_detector_conversion_is_a_failed_row_not_a_crash(tmp_path, monkeypatch):
    import edge3dfa.converters as converters
    from edge3dfa.converters import get_format
    from edge3dfa.workflows.detector import export_detector

    def convert(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("detector converter bug")

    monkeypatch.setattr(converters, "convert", convert)
    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    said = []
    (row,) = export_detector([get_format("onnx")], None, tmp_path / "out", tmp_path / "out" / "mb05", log=said.append)
    d = judge(row)
    assert d["status"] == "error" and d["verdict"] == "FAILED" and "RuntimeError: detector converter bug" in d["reason"]
    assert Path(d["crash_log"]).is_file() and any("detector converter bug" in s for s in said)


def test_plan_says_which_formats_get_no_detector_and_why():
    from edge3dfa.converters import get_format
    from edge3dfa.workflows.detector import plan_detector

    fmts = [get_format(n) for n in ("onnx", "tflite", "executorch")]
    take, skip = plan_detector(fmts, leave_out=False)
    assert [f.name for f in take] == ["onnx", "tflite"]
    assert [s["what"] for s in skip] == ["faceboxes executorch"] and "regressors" in skip[0]["reason"]
    take, skip = plan_detector(fmts, leave_out=True)
    assert take == [] and "--no-detector" in skip[0]["reason"]


def test_pipeline_mode_runs_a_fixed_size_detector_at_its_size(monkeypatch):
    """validate --mode pipeline --detector x.tflite: the photos must be shrunk and padded to the artifact's size
    (the wrapper once passed no size: a 450x450 blob into a 480x640 model, exit 2)."""
    import edge3dfa.cli as cli
    import edge3dfa.datasets as datasets
    from edge3dfa.runtime.detect import prior_boxes
    from edge3dfa.validation.cli import dataset_of

    seen = []

    class FixedSize:  # a FaceBoxes artifact exported at 480x640, as TFLite's is
        name, input_shape = "fixed.tflite", (3, 480, 640)

        def run(self, blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            seen.append(blob.shape)
            p = len(prior_boxes(*blob.shape[2:]))
            return np.zeros((1, p, 4), np.float32), np.tile(np.float32([1, 0]), (1, p, 1))

    monkeypatch.setattr(cli, "open_artifact", lambda *a, **k: FixedSize())
    monkeypatch.setattr(datasets, "load_pipeline", lambda detect, *a: detect(np.zeros((450, 450, 3), np.uint8)))
    args = SimpleNamespace(batch=1, mode="pipeline", detector="x.tflite", threads=None, no_verify=False,
                           samples="1", ground_truth="original", images_dir=None)
    assert dataset_of(args).shape == (0, 5) and seen == [(1, 3, 480, 640)]


# ---------------------------------------------------------------- end to end: export, run, validate (slow)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x1, y1, x2, y2), written here, independent of the package's box_iou."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union)


def _best_ious(ref: np.ndarray, got: np.ndarray) -> list[float]:
    return [max(_iou(r, g) for g in got) for r in ref]


@pytest.mark.slow
def test_export_writes_a_detector_the_pi_runs_like_pytorch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("ai_edge_litert")
    from edge3dfa import assets
    from edge3dfa.cli import main
    from edge3dfa.models.faceboxes import load_faceboxes, torch_forward
    from edge3dfa.runtime import read_image
    from edge3dfa.runtime.detect import FaceBoxesDetector

    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["export", "--to", "tflite", "--precision", "fp32", "--samples", "20", "--parity-count", "8",
               "--latency-runs", "0", "--out", str(out)])
    summary = capsys.readouterr().out
    detector = out / "faceboxes" / "tflite" / "faceboxes_fp32.tflite"
    regressor = out / "mb05" / "tflite" / "mb05_fp32.tflite"
    report = json.loads((out / "mb05" / "report.json").read_text())
    assert rc == 0 and report["verdict"] == "PASSED", report["verdict_reasons"]
    assert detector.is_file() and regressor.is_file()
    # the command to ship names both, as printed and as recorded
    want = f"edge3dfa run photo.jpg --artifact {regressor} --detector {detector}"
    assert want in summary
    assert report["recommended"][0]["command"].endswith("--detector ../faceboxes/tflite/faceboxes_fp32.tflite")
    (d,) = report["detectors"]
    assert d["verdict"] == "PASSED" and d["artifact"] == "../faceboxes/tflite/faceboxes_fp32.tflite"

    manifest = json.loads(detector.with_suffix(".json").read_text())
    size = tuple(manifest["input"]["shape"][1:3])  # NHWC [N, H, W, 3]
    torch_detector = FaceBoxesDetector(torch_forward(load_faceboxes()), input_size=size)
    photo = assets.fetch("trump_hillary")
    ref = torch_detector(read_image(photo))
    entry = manifest["parity"]["photo trump_hillary"]
    figures = [v for k, v in entry.items() if k not in ("blob", "faces")]
    assert all(isinstance(v, float) and math.isfinite(v) for v in figures), entry
    assert entry["faces"] == [len(ref), len(ref)] and len(ref) == 2  # the photo has two faces

    # run --detector with the exported file finds the same faces as PyTorch, at the same places
    rc = main(["run", str(photo), "--artifact", str(regressor), "--detector", str(detector),
               "--out-dir", str(tmp_path / "run")])
    faces = json.loads((tmp_path / "run" / "trump_hillary.json").read_text())
    faces = faces["faces"] if isinstance(faces, dict) else faces
    got = np.array([f["box"] for f in faces])
    ious = _best_ious(ref[:, :4], got)
    assert rc == 0 and len(got) == len(ref) and min(ious) > 0.99, ious
    # the manifest's IoU is what this test measures independently (the JSON rounds boxes to 0.01 px)
    assert entry["box_min_iou"] == pytest.approx(min(ious), abs=1e-3)

    # validate --mode pipeline takes the exported detector (it shrinks and pads photos to its size)
    rc = main(["validate", str(out / "mb05"), "--mode", "pipeline", "--detector", str(detector), "--samples", "8",
               "--latency-runs", "0", "--report-dir", str(tmp_path / "pipeline")])
    pipeline = json.loads((tmp_path / "pipeline" / "report.json").read_text())
    assert rc == 0 and pipeline["dataset"]["mode"] == "pipeline" and pipeline["dataset"]["count"] == 8
