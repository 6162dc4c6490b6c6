"""Phone bundles: the in-graph post-processing equals the numpy runtime (the executable spec), and the spec
itself matches independent references (rotations built from known angles, exact uint8 <-> float crops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge3dfa import bundle, runtime
from edge3dfa.errors import Edge3dfaError

torch = pytest.importorskip("torch")

from conftest import eval_crops  # noqa: E402


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch) with yaw about y, as upstream's matrix2angle inverts it: R20 = -sin(yaw)
    for this convention, so yaw is negated (upstream reads yaw = asin(R20))."""
    y, p, r = (math.radians(v) for v in (-yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _cams(angles: list[tuple[float, float, float]], scale: float = 0.0013) -> np.ndarray:
    cams = np.zeros((len(angles), 3, 4))
    for i, a in enumerate(angles):
        cams[i, :, :3] = scale * _rotation(*a)
        cams[i, :, 3] = (60.0, 60.0, 0.0)
    return cams


def test_pose_graph_recovers_known_angles() -> None:
    """Rotations built from known yaw/pitch/roll (an independent reference, not the runtime) come back, in the
    graph and in the runtime alike, including beyond the gimbal-lock threshold where roll is defined as 0."""
    from edge3dfa.models.bundle import pose_degrees

    angles = [(0.0, 0.0, 0.0), (30.0, -20.0, 10.0), (-75.0, 15.0, -40.0), (89.0, 0.0, 0.0), (-60.0, 170.0, 5.0)]
    cams = _cams(angles)
    got = pose_degrees(torch.tensor(cams, dtype=torch.float32)).numpy()
    params = np.concatenate([cams.reshape(len(cams), 12), np.zeros((len(cams), 50))], 1)
    spec = runtime.pose(params)
    np.testing.assert_allclose(got[:3], np.array(angles[:3]), atol=0.01)
    np.testing.assert_allclose(spec[:3], np.array(angles[:3]), atol=0.01)
    assert abs(got[3, 0] - 90.0) < 1e-3 and got[3, 2] == 0.0  # |R20| > 0.998: yaw +-90, roll 0 (upstream)
    np.testing.assert_allclose(got, spec, atol=0.01)


def test_uint8_conversion_is_exact_and_refuses_off_grid_input() -> None:
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (3, 120, 120, 3), dtype=np.uint8)
    x = runtime.normalise(u)  # the runtime's own normalisation of BGR crops
    for channels in ("bgr", "rgb"):
        img = bundle.to_image_uint8(x, channels)
        assert img.dtype == np.uint8 and img.shape == (3, 120, 120, 3)
        np.testing.assert_array_equal(img, u if channels == "bgr" else u[..., ::-1])
        np.testing.assert_array_equal(bundle.from_image_uint8(img, channels), x)
    with pytest.raises(Edge3dfaError, match="not a normalised uint8 crop"):
        bundle.to_image_uint8(x + 0.001)
    with pytest.raises(Edge3dfaError):
        bundle.to_image_uint8(np.full((1, 3, 120, 120), 1.5, np.float32))


@pytest.mark.parametrize("channels,layout", [("bgr", "NHWC"), ("rgb", "NHWC"), ("rgb", "NCHW")])
def test_regressor_bundle_module_equals_the_runtime(channels: str, layout: str) -> None:
    """The torch bundle on uint8 crops vs ``edge3dfa.runtime`` on the network's params: landmarks within 0.01 px
    (mean), pose within 0.05 degrees, de-normalised params within float32 rounding (the issue's fp32 targets)."""
    from edge3dfa.models import Checkpoint
    from edge3dfa.models.bundle import regressor_bundle

    x = eval_crops(0, 64)
    net = Checkpoint.open("mb05").load()
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
        spec = bundle.reference(out)
        img = bundle.to_image_uint8(x, channels, layout)
        inp = torch.from_numpy(img if layout == "NHWC" else img.astype(np.float32))
        lms, pose, params = (t.numpy() for t in regressor_bundle(net, channels, layout)(inp))
    assert lms.shape == (64, 68, 3) and pose.shape == (64, 3) and params.shape == (64, 62)
    assert np.linalg.norm(lms - spec["landmarks"], axis=2).mean() <= 0.01
    assert np.abs(pose - spec["pose"]).max() <= 0.05
    np.testing.assert_allclose(bundle.normalised_params(params), out, atol=2e-5)  # float32 rounding of p*std+mean


def test_reference_landmarks_are_the_runtime_pipeline() -> None:
    """The spec's crop-pixel landmarks mapped with the two README lines equal the runtime's image landmarks for
    an arbitrary roi: the mapping the app does is exactly what ``runtime.landmarks`` does."""
    params = np.random.default_rng(1).normal(0, 0.5, (4, 62)).astype(np.float32)
    roi = np.array([[10.0, 20.0, 250.0, 260.0], [-30, -5, 90, 115], [100, 100, 400, 400], [0, 0, 60, 60]])
    want = runtime.landmarks(params, roi).transpose(0, 2, 1)
    crop = bundle.reference(params)["landmarks"]
    w, h = (roi[:, 2] - roi[:, 0])[:, None], (roi[:, 3] - roi[:, 1])[:, None]
    got = np.stack([crop[..., 0] * w / 120 + roi[:, :1], crop[..., 1] * h / 120 + roi[:, 1:2],
                    crop[..., 2] * (w + h) / 240], axis=2)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.slow
def test_onnx_bundle_end_to_end(tmp_path) -> None:
    """convert --bundle (ONNX fp32): the file opens by suffix, carries its contract, takes uint8 NHWC, and its
    outputs equal the spec; predict (params normalised back) equals PyTorch."""
    from edge3dfa.converters import convert
    from edge3dfa.models import Checkpoint
    from edge3dfa.target import open_target

    (art,) = convert("mb05", to="onnx", precision="fp32", out_dir=tmp_path, bundle={"channels": "rgb"},
                     verbose=False, parity_count=16)
    assert art.path.name == "mb05_fp32_bundle.onnx" and art.manifest.bundle["input"]["channel_order"] == "RGB"
    t = open_target(art.path, threads=1)
    assert t.bundle == art.manifest.bundle and t.input_contract()["dtype"] == "uint8"
    x = eval_crops(100, 32)
    ref = Checkpoint.open("mb05").target(1).predict(x)
    got, spec = t.predict_bundle(x), bundle.reference(ref)
    assert np.linalg.norm(got["landmarks"] - spec["landmarks"], axis=2).mean() <= 0.01
    assert np.abs(got["pose"] - spec["pose"]).max() <= 0.05
    np.testing.assert_allclose(t.predict(x), ref, atol=1e-4)
    for name in ("aflw2000", "calibration"):
        assert art.manifest.parity[name]["bundle_landmark_mean_px"] <= 0.01
