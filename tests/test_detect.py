"""FaceBoxes detector: numpy post-processing against hand-computed values, then the real model on photos.

Expected numbers come from the FaceBoxes anchor design (config.py / prior_box.py of 3DDFA_V2), the SSD
decoding formula and the Fast R-CNN NMS rules worked out by hand, never from the code under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge3dfa.errors import Edge3dfaError
from edge3dfa.runtime.detect import FaceBoxesDetector, decode, nms, prepare, prior_boxes

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- priors

@pytest.mark.parametrize(("height", "width", "count"), [
    # stride 32: 21 anchors per cell (4x4 of 32px, 2x2 of 64px, one 128px); stride 64 and 128: one each.
    (1024, 1024, 32 * 32 * (16 + 4 + 1) + 16 * 16 * 1 + 8 * 8 * 1),   # 21824
    (720, 1080, 23 * 34 * 21 + 12 * 17 + 6 * 9),                      # ceil(720/32)=23, ceil(1080/32)=34
    (333, 517, 11 * 17 * 21 + 6 * 9 + 3 * 5),                         # 3996: every map rounds up
    (1, 1, 21 + 1 + 1),
])
def test_prior_count(height: int, width: int, count: int) -> None:
    assert prior_boxes(height, width).shape == (count, 4)


def test_prior_values_square() -> None:
    p = prior_boxes(1024, 1024)
    assert p.dtype == np.float32
    s = 1 / 1024
    np.testing.assert_allclose(p[0], [0, 0, 32 * s, 32 * s])                 # first dense 32px anchor
    np.testing.assert_allclose(p[1], [0.25 * 32 * s, 0, 32 * s, 32 * s])     # dense x offset moves first
    np.testing.assert_allclose(p[4], [0, 0.25 * 32 * s, 32 * s, 32 * s])     # then the y offset
    np.testing.assert_allclose(p[15], [24 * s, 24 * s, 32 * s, 32 * s])      # last of the 4x4
    np.testing.assert_allclose(p[16], [0, 0, 64 * s, 64 * s])                # 2x2 of 64px
    np.testing.assert_allclose(p[19], [16 * s, 16 * s, 64 * s, 64 * s])
    np.testing.assert_allclose(p[20], [16 * s, 16 * s, 128 * s, 128 * s])    # 128px at the cell centre
    np.testing.assert_allclose(p[21], [32 * s, 0, 32 * s, 32 * s])           # next cell, same row
    np.testing.assert_allclose(p[32 * 21], [0, 32 * s, 32 * s, 32 * s])      # next row
    np.testing.assert_allclose(p[21504], [32 * s, 32 * s, 0.25, 0.25])       # first 256px anchor (stride 64)
    np.testing.assert_allclose(p[-1], [0.9375, 0.9375, 0.5, 0.5])            # last 512px anchor, cell (7,7)


def test_prior_values_non_square() -> None:
    p = prior_boxes(64, 128)   # x normalised by the width, y by the height
    np.testing.assert_allclose(p[0], [0, 0, 32 / 128, 32 / 64])
    np.testing.assert_allclose(p[20], [16 / 128, 16 / 64, 1.0, 2.0])
    np.testing.assert_allclose(p[-1], [64 / 128, 64 / 64, 4.0, 8.0])


# ---------------------------------------------------------------- decode

def test_decode_by_hand() -> None:
    priors = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3, 0.3]], np.float32)
    # centre: +1 * 0.1 * 0.2 in x, -1 * 0.1 * 0.4 in y; height: exp(0.2 * ln2 / 0.2) = x2.
    loc = np.array([[1.0, -1.0, 0.0, math.log(2) / 0.2], [0, 0, 0, 0]], np.float32)
    boxes = decode(loc, priors)
    np.testing.assert_allclose(boxes[0], [0.52 - 0.1, 0.46 - 0.4, 0.52 + 0.1, 0.46 + 0.4], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [-0.05, 0.05, 0.25, 0.35], atol=1e-6)   # zero offsets: the prior
    np.testing.assert_allclose(decode(loc, priors, variances=(0.2, 0.1))[0],
                               [0.54 - 0.1, 0.42 - 0.2 * 2 ** 0.5, 0.54 + 0.1, 0.42 + 0.2 * 2 ** 0.5],
                               atol=1e-6)


# ---------------------------------------------------------------- nms (areas and overlaps count pixels: +1)

def test_nms_three_boxes_by_hand() -> None:
    a = [0, 0, 9, 9, 0.9]     # 10x10 = 100 px
    b = [5, 0, 14, 9, 0.8]    # with a: 5x10 = 50 px, IoU 50 / 150 = 0.333
    c = [0, 6, 9, 15, 0.7]    # with a: 10x4 = 40 px, IoU 40 / 160 = 0.25; with b: 5x4 = 20, IoU 20 / 180
    dets = np.array([c, a, b], np.float32)   # not in score order
    assert nms(dets, 0.3).tolist() == [1, 0]
    assert nms(dets, 0.34).tolist() == [1, 2, 0]
    assert nms(dets, 0.2).tolist() == [1]


def test_nms_suppressed_box_suppresses_nothing() -> None:
    a = [0, 0, 9, 9, 0.9]
    b = [4, 0, 13, 9, 0.8]    # with a: 6x10 = 60, IoU 60 / 140 = 0.43 -> dropped
    d = [8, 0, 17, 9, 0.7]    # with a: 2x10 = 20, IoU 20 / 180 = 0.11; with b: 0.43 but b is gone
    assert nms(np.array([a, b, d], np.float32), 0.3).tolist() == [0, 2]


def test_nms_iou_equal_to_threshold_suppresses() -> None:
    a = [0, 0, 9, 9, 0.9]
    half = [0, 0, 9, 4, 0.5]  # 10x5 inside a: IoU exactly 50 / 100
    dets = np.array([a, half], np.float32)
    assert nms(dets, 0.5).tolist() == [0]
    assert nms(dets, 0.51).tolist() == [0, 1]


def test_nms_empty() -> None:
    keep = nms(np.zeros((0, 5), np.float32), 0.3)
    assert keep.shape == (0,)


def _cpu_nms_reference(dets: np.ndarray, thresh: float) -> list[int]:
    """Upstream's Cython cpu_nms transcribed as scalar loops: the definition nms must reproduce."""
    x1, y1, x2, y2, scores = (dets[:, k] for k in range(5))
    areas = (x2 - x1 + np.float32(1)) * (y2 - y1 + np.float32(1))
    order = scores.argsort()[::-1]
    suppressed = np.zeros(len(dets), bool)
    keep = []
    for ii in range(len(dets)):
        i = order[ii]
        if suppressed[i]:
            continue
        keep.append(int(i))
        for jj in range(ii + 1, len(dets)):
            j = order[jj]
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]) + np.float32(1))
            h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]) + np.float32(1))
            inter = np.float32(w * h)
            if float(inter / (areas[i] + areas[j] - inter)) >= thresh:
                suppressed[j] = True
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_cpu_nms_on_clutter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    dets = np.hstack([xy, xy + wh, rng.uniform(0, 1, (300, 1))]).astype(np.float32)
    dets[::7, 4] = 0.5   # score ties, broken the same way
    keep = nms(dets, 0.3).tolist()
    assert 1 < len(keep) < 300
    assert keep == _cpu_nms_reference(dets, 0.3)


# ---------------------------------------------------------------- prepare

@pytest.mark.parametrize(("shape", "blob_hw", "scale"), [
    ((100, 200), (100, 200), 1.0),        # small images are never enlarged
    ((1440, 1000), (720, 500), 0.5),      # too tall: 720 / 1440
    ((500, 2160), (250, 1080), 0.5),      # too wide: 1080 / 2160
    ((1440, 4320), (360, 1080), 0.25),    # both: 720/1440 = 0.5, then 4320 * 0.5 > 1080 -> x0.5 again
    ((1440, 2000), (720, 1000), 0.5),     # the width is judged after the height's shrink: 1000 fits
])
def test_prepare_scaling(shape: tuple[int, int], blob_hw: tuple[int, int], scale: float) -> None:
    blob, s = prepare(np.zeros(shape + (3,), np.uint8))
    assert blob.shape == (1, 3) + blob_hw and blob.dtype == np.float32
    assert s == pytest.approx(scale)


def test_prepare_mean_and_channel_order() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30   # B, G, R
    blob, _ = prepare(img)
    np.testing.assert_array_equal(blob[0, :, 5, 7], [10 - 104, 20 - 117, 30 - 123])


def test_prepare_fixed_size_pads_with_zero() -> None:
    img = np.full((1440, 1000, 3), 200, np.uint8)
    blob, s = prepare(img, input_size=(720, 1080))
    assert blob.shape == (1, 3, 720, 1080) and s == pytest.approx(0.5)
    np.testing.assert_array_equal(blob[0, :, 0, 0], [96, 83, 77])
    assert not blob[0, :, :, 500:].any()   # 1000 * 0.5 = 500 columns of image, then padding


# ---------------------------------------------------------------- detector plumbing with a scripted model

def _scripted_forward(scores: dict[int, float], n_priors: int):  # noqa: ANN202
    def forward(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert blob.shape == (1, 3, 64, 64)
        conf = np.zeros((1, n_priors, 2), np.float32)
        conf[0, :, 0] = 1
        for i, s in scores.items():
            conf[0, i] = [1 - s, s]
        return np.zeros((1, n_priors, 4), np.float32), conf
    return forward


def test_detector_with_scripted_scores() -> None:
    # 64x64 input: 2x2 cells of 21 anchors + 1 + 1 = 86 priors. Zero offsets give the priors themselves.
    # index 20: 128px anchor of cell (0,0) at (16,16) -> (-48,-48,80,80)
    # index 21: first 32px anchor of cell (0,1) at (32,0) -> (16,-16,48,16)
    # index 41: 128px anchor of cell (0,1) at (48,16) -> (-16,-48,112,80): IoU with #20 = 97/161 -> dropped
    # index 84: the 256px anchor (stride 64) at (32,32) -> (-96,-96,160,160), IoU with #20 = 129^2/257^2;
    #   kept by NMS but its score 0.4 < 0.5 is not reported
    scores = {20: 0.9, 21: 0.8, 41: 0.85, 84: 0.4}
    det = FaceBoxesDetector(_scripted_forward(scores, 86))
    out = det(np.zeros((64, 64, 3), np.uint8))
    assert out.dtype == np.float32 and out.shape == (2, 5)
    np.testing.assert_allclose(out, [[-48, -48, 80, 80, 0.9], [16, -16, 48, 16, 0.8]], atol=1e-4)
    assert det.priors(64, 64) is det.priors(64, 64)

    low_det = FaceBoxesDetector(_scripted_forward(scores, 86), score_threshold=0.3)
    low = low_det(np.zeros((64, 64, 3), np.uint8))
    np.testing.assert_allclose(low[2], [-96, -96, 160, 160, 0.4], atol=1e-4)
    assert low.shape == (3, 5)


def test_detector_no_face_and_wrong_model_size() -> None:
    assert FaceBoxesDetector(_scripted_forward({}, 86))(np.zeros((64, 64, 3), np.uint8)).shape == (0, 5)
    with pytest.raises(Edge3dfaError, match="input_size"):
        FaceBoxesDetector(_scripted_forward({}, 90))(np.zeros((64, 64, 3), np.uint8))


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def torch_detector() -> FaceBoxesDetector:
    pytest.importorskip("torch")
    from edge3dfa.models.faceboxes import load_faceboxes, torch_forward

    return FaceBoxesDetector(torch_forward(load_faceboxes()))


def _photo(name: str) -> np.ndarray:
    from edge3dfa.assets import fetch

    return cv2.imread(str(fetch(name)))


def _check_faces(dets: np.ndarray, img: np.ndarray, n: int) -> np.ndarray:
    h, w = img.shape[:2]
    assert dets.shape == (n, 5), dets
    assert (np.diff(dets[:, 4]) <= 0).all()                       # best first
    assert (dets[:, 4] > 0.9).all()
    bw, bh = dets[:, 2] - dets[:, 0], dets[:, 3] - dets[:, 1]
    assert ((bw > 0.05 * min(h, w)) & (bw < 0.6 * w)).all()        # face-sized, not a speck or the frame
    assert ((bh / bw > 0.9) & (bh / bw < 1.8)).all()                # FaceBoxes faces: a bit taller than wide
    assert (dets[:, 0] > -0.05 * w).all() and (dets[:, 2] < 1.05 * w).all()
    assert (dets[:, 1] > -0.05 * h).all() and (dets[:, 3] < 1.05 * h).all()
    return dets[np.argsort(dets[:, 0])]


def test_emma_three_portraits(torch_detector: FaceBoxesDetector) -> None:
    img = _photo("emma")   # a collage of three photos side by side, one face in each
    faces = _check_faces(torch_detector(img), img, 3)
    centres = (faces[:, 0] + faces[:, 2]) / 2 / img.shape[1]
    assert centres[0] < 1 / 3 < centres[1] < 2 / 3 < centres[2]


def test_jianzhuguo_one_face(torch_detector: FaceBoxesDetector) -> None:
    img = _photo("JianzhuGuo")
    _check_faces(torch_detector(img), img, 1)


def test_trump_hillary_two_faces(torch_detector: FaceBoxesDetector) -> None:
    img = _photo("trump_hillary")
    faces = _check_faces(torch_detector(img), img, 2)
    assert faces[0, 2] < img.shape[1] / 2 < faces[1, 0]   # one on each side


def test_network_output_matches_prior_count() -> None:
    torch = pytest.importorskip("torch")
    from edge3dfa.models.faceboxes import FaceBoxesNet

    loc, conf = FaceBoxesNet().eval()(torch.zeros(1, 3, 333, 517))
    assert tuple(loc.shape) == (1, 3996, 4) and tuple(conf.shape) == (1, 3996, 2)
    torch.testing.assert_close(conf.sum(-1), torch.ones(1, 3996))   # softmax probabilities


def test_load_faceboxes_refuses_other_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edge3dfa.models.faceboxes import load_faceboxes

    bad = tmp_path / "other.pth"
    torch.save({"conv1.conv.weight": torch.zeros(24, 3, 7, 7)}, bad)
    with pytest.raises(Edge3dfaError, match="FaceBoxes"):
        load_faceboxes(bad)


def test_runtime_imports_without_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys; sys.modules['torch'] = None; import edge3dfa.runtime.detect; "
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
