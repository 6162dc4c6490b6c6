"""Runtime formulas against hand-computed cases and upstream's definitions (no torch needed)."""

import subprocess
import sys

import numpy as np
import pytest

from edge3dfa import runtime
from edge3dfa.errors import Edge3dfaError
from edge3dfa.runtime import bfm as bfm_mod
from edge3dfa.runtime.geometry import pose, to_image
from edge3dfa.runtime.meshes import write_mesh


def test_roi_from_box_hand_computed():
    # box 100x200: mean side 150, centre (150, 200) shifted down 0.14*150 = 21, side int(1.58*150) = 237
    roi = runtime.roi_from_box(np.array([[100, 100, 200, 300, 0.9]]))
    np.testing.assert_allclose(roi, [[31.5, 102.5, 268.5, 339.5]])


def test_roi_from_landmarks_hand_computed():
    pts = np.zeros((1, 3, 68))
    pts[0, 0] = np.linspace(10, 30, 68)
    pts[0, 1] = np.linspace(20, 60, 68)
    h = 40 * np.sqrt(2) / 2  # bounding square of side 40, its diagonal is the roi side
    np.testing.assert_allclose(runtime.roi_from_landmarks(pts), [[20 - h, 40 - h, 20 + h, 40 + h]])


def test_crop_pads_outside_with_zeros():
    img = np.arange(1, 17, dtype=np.uint8).reshape(4, 4)
    out = runtime.crop(img, np.array([-1, -1, 2, 2]))
    np.testing.assert_array_equal(out, [[0, 0, 0], [0, 1, 2], [0, 5, 6]])
    out = runtime.crop(img, np.array([3, 2, 6, 4]))  # right edge: one column inside, two padded
    np.testing.assert_array_equal(out, [[12, 0, 0], [16, 0, 0]])
    with pytest.raises(Edge3dfaError):
        runtime.crop(img, np.array([2, 2, 2, 3]))


def test_normalise_layout_and_scale():
    crops = np.zeros((2, 4, 5, 3), np.uint8)
    crops[1, 0, 0] = (255, 0, 128)  # B, G, R stay in that channel order
    x = runtime.normalise(crops)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, :, 0, 0], [(255 - 127.5) / 128, -127.5 / 128, 0.5 / 128])


def test_to_image_hand_computed():
    pts = np.array([[[61.0, 31.0], [20.0, 20.0], [11.0, 1.0]]])  # two points, crop frame
    out = to_image(pts, np.array([[10, 20, 250, 260]]))  # scale 2 in x and y
    # x: (61-1)*2+10 = 130; y: (120-20)*2+20 = 220; z: (11-1)*2 = 20, (1-1)*2 = 0, min -> 0
    np.testing.assert_allclose(out[0], [[130, 70], [220, 220], [20, 0]])


def _rot(yaw, pitch, roll):
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    # upstream's yaw is asin(R[2,0]) = -(rotation about y): R = Rz(roll) Ry(-yaw) Rx(pitch)
    return rz @ ry.T @ rx


@pytest.mark.parametrize("ypr", [(25, -10, 5), (-60, 20, -15), (0, 0, 0), (80, 5, 30)])
def test_pose_from_known_rotation(ypr):
    params = np.zeros((1, 62), np.float32)
    cam = np.c_[1.3e-3 * _rot(*ypr), [60, 50, 10]]
    params[0, :12] = cam.reshape(-1)
    np.testing.assert_allclose(pose(params)[0], ypr, atol=1e-3)


def test_reconstruct_hand_built_model():
    u = np.array([1, 2, 3, 4, 5, 6], np.float32)  # two vertices, xyz interleaved
    w = np.zeros((6, 50), np.float32)
    w[0, 0] = 1.0  # shape param 0 moves vertex 0 in x
    w[5, 40] = 2.0  # expression param 0 moves vertex 1 in z
    model = bfm_mod.BFM(u, w.T.copy(), np.zeros(62, np.float32), np.ones(62, np.float32))
    p = np.zeros((1, 62), np.float32)
    p[0, :12] = [2, 0, 0, 10, 0, 2, 0, 20, 0, 0, 2, 30]  # R = 2*I, t = (10, 20, 30)
    p[0, 12], p[0, 52] = 3.0, 0.5
    out = bfm_mod.reconstruct(p, model)
    # vertex 0 = 2*(1+3, 2, 3) + t = (18, 24, 36); vertex 1 = 2*(4, 5, 6+1) + t = (18, 30, 44)
    np.testing.assert_allclose(out[0], [[18, 18], [24, 30], [36, 44]])


def test_mean_face_is_a_plausible_crop_face():
    pts = bfm_mod.reconstruct(runtime.denormalise(np.zeros((1, 62))))[0]
    x, y = pts[0], 120 - pts[1]
    assert 20 < x.min() and x.max() < 100 and 10 < y.min() and y.max() < 110
    assert y[19] < y[37] < y[30] < y[57] < y[8]  # brow < eye < nose tip < lower lip < chin (image y down)
    assert x[36:42].mean() < x[42:48].mean()  # right eye (36-41) left of left eye in the image


def test_dense_path_matches_sparse_at_keypoints(tmp_path):
    """Synthetic full BFM: real dense mean shape, random bases whose keypoint rows are the real 68-pt bases."""
    base = runtime.load_bfm68()
    from edge3dfa import assets

    u = np.load(assets.fetch("u_dense")).reshape(-1)
    rng = np.random.default_rng(0)
    w_shp = rng.normal(0, 1e3, (u.size, 40)).astype(np.float32)
    w_exp = rng.normal(0, 1e3, (u.size, 10)).astype(np.float32)
    w_shp[base.keypoints], w_exp[base.keypoints] = base.w[:40].T, base.w[40:].T
    np.savez(tmp_path / "bfm.npz", u=u[:, None], w_shp=w_shp, w_exp=w_exp)
    dense = runtime.load_dense_bfm(tmp_path / "bfm.npz")
    assert dense.n_vertices == 38365 and dense.tri.shape == (76073, 3)
    params = runtime.denormalise(rng.normal(0, 1, (3, 62)).astype(np.float32))
    d = bfm_mod.reconstruct(params, dense)[:, :, base.keypoints[::3] // 3]
    s = bfm_mod.reconstruct(params, base)
    # the two mean shapes agree to 0.0078 (PROVENANCE); times the camera scale that is far below 1e-3 px
    np.testing.assert_allclose(d, s, atol=2e-3)


def test_dense_bfm_errors(tmp_path):
    with pytest.raises(Edge3dfaError, match="not found"):
        runtime.load_dense_bfm(tmp_path / "nope.pkl")
    np.savez(tmp_path / "bad.npz", u=np.zeros((6, 1)))
    with pytest.raises(Edge3dfaError, match="missing"):
        runtime.load_dense_bfm(tmp_path / "bad.npz")
    import pickle

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"u": print}))
    with pytest.raises(Edge3dfaError, match="refused"):
        runtime.load_dense_bfm(tmp_path / "evil.pkl")


def test_ply_and_obj_round_trip(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.5]], np.float32)
    t = np.array([[0, 1, 2]])
    data = write_mesh(tmp_path / "m.ply", v.T, t).read_bytes()
    header, body = data.split(b"end_header\n")
    assert b"element vertex 3" in header and b"element face 1" in header
    np.testing.assert_array_equal(np.frombuffer(body[:36], "<f4").reshape(3, 3), v)
    assert body[36] == 3 and np.frombuffer(body[37:49], "<i4").tolist() == [0, 1, 2]
    lines = write_mesh(tmp_path / "m.obj", v.T, t).read_text().splitlines()
    assert lines[2] == "v 0.0000 1.0000 0.5000" and lines[3] == "f 1 2 3"
    with pytest.raises(Edge3dfaError):
        write_mesh(tmp_path / "bad.ply", v.T, np.array([[0, 1, 3]]))
    assert not (tmp_path / "bad.ply").exists()
    with pytest.raises(Edge3dfaError, match="unknown mesh format 'stl'"):
        write_mesh(tmp_path / "m.stl", v.T, t)
    assert not (tmp_path / "m.stl").exists()


@pytest.mark.parametrize("kind", ["gray", "bgra", "u16", "float"])
def test_image_conversions(kind):
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    img = {"gray": bgr[:, :, 0], "bgra": np.dstack([bgr, np.full((8, 9), 7, np.uint8)]),
           "u16": bgr.astype(np.uint16) * 257, "float": bgr / 255.0}[kind]
    out = runtime.as_bgr_uint8(img)
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8
    want = np.repeat(bgr[:, :, :1], 3, 2) if kind == "gray" else bgr
    np.testing.assert_array_equal(out, want)


def test_runtime_runs_without_heavy_frameworks(assets_dir):
    """Full image -> landmarks with torch, tensorflow, onnxruntime and coremltools made unimportable."""
    code = f"""
import sys
for m in ("torch", "tensorflow", "onnxruntime", "coremltools", "ai_edge_litert", "onnx"):
    sys.modules[m] = None
import numpy as np
from edge3dfa import runtime
from edge3dfa.runtime import detect, draw, meshes
img = runtime.read_image({str(assets_dir / "upstream/3ddfa_v2/examples/inputs/emma.jpg")!r})
roi = runtime.roi_from_box(np.array([[300, 200, 500, 460, 1.0]]))
x = runtime.crops_from_rois(img, roi)
lm = runtime.landmarks(np.zeros((1, 62), np.float32), roi)
draw.draw_faces(img, lm, runtime.denormalise(np.zeros((1, 62))))
assert x.shape == (1, 3, 120, 120) and lm.shape == (1, 3, 68) and np.isfinite(lm).all()
assert roi[0, 0] < lm[0, 0].min() and lm[0, 0].max() < roi[0, 2]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
