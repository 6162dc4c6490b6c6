"""ONNX phone bundles beyond fp32: the int8 regressor bundle against the executable spec, the FaceBoxes bundle (NMS
in the graph) against the runtime's detector, both bundles through ``edge3dfa run``, a tampered contract refused.

The references are independent of the code under test: ``bundle.reference`` of the PyTorch params (the numpy
runtime), and ``FaceBoxesDetector`` over the PyTorch FaceBoxes (numpy decode and upstream's NMS)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import eval_crops, run_cli

from edge3dfa import bundle
from edge3dfa.runtime.detect import FaceBoxesDetector, box_iou

SIZE = (480, 640)


class _FakeDetectorBundle:
    """A detector bundle target as ``FaceBoxesDetector.of_target`` sees it: fixed input, contract, boxes/scores."""

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, nms: str | None) -> None:
        self.input_shape = (3, *SIZE)
        self.name = "fake:detector_bundle"
        self.bundle = bundle.detector_contract(*SIZE, nms=nms)
        self.outputs = [np.asarray(boxes, np.float32), np.asarray(scores, np.float32)]
        self.blobs: list[np.ndarray] = []

    def run(self, blob: np.ndarray) -> list[np.ndarray]:
        self.blobs.append(blob)
        return self.outputs


# two heavily overlapping boxes (IoU ~0.8), one apart, one below the face threshold, in input pixels
_BOXES = np.array([[100, 100, 200, 200], [105, 102, 205, 198], [300, 50, 380, 150], [10, 10, 60, 60]], np.float32)
_SCORES = np.array([0.9, 0.8, 0.7, 0.3], np.float32)


@pytest.mark.parametrize("in_model", [False, True])
def test_detector_bundle_outputs_become_photo_boxes(in_model: bool) -> None:
    """A photo twice the input size (shrink 0.5): boxes come back doubled; NMS runs here only when the contract says
    it is not in the model (a model that has it already returns one box per face: given both here, both stay)."""
    fake = _FakeDetectorBundle(_BOXES, _SCORES, "in the model: test" if in_model else None)
    det = FaceBoxesDetector.of_target(fake)
    assert det.input_size == SIZE and det.outputs == ("boxes+nms" if in_model else "boxes")
    dets = det(np.zeros((960, 1280, 3), np.uint8))
    assert fake.blobs[0].shape == (1, 3, *SIZE)
    kept = [0, 1, 2] if in_model else [0, 2]  # the 0.8 box overlaps the 0.9 one at IoU >= 0.3: NMS drops it
    np.testing.assert_allclose(dets[:, :4], _BOXES[kept] * 2)
    np.testing.assert_allclose(dets[:, 4], _SCORES[kept])


def test_regressor_bundle_is_not_a_detector() -> None:
    from edge3dfa.errors import Edge3dfaError

    fake = _FakeDetectorBundle(_BOXES, _SCORES, None)
    fake.bundle = bundle.regressor_contract()
    with pytest.raises(Edge3dfaError, match="not a face detector"):
        FaceBoxesDetector.of_target(fake)


def _nms_session(p: int, area_pixel: float):
    ort = pytest.importorskip("onnxruntime")
    from edge3dfa.converters.onnx.nms import nms_on_given_boxes

    return ort.InferenceSession(nms_on_given_boxes(p, area_pixel), providers=["CPUExecutionProvider"])


def test_graph_nms_keeps_what_the_runtime_keeps() -> None:
    """Dense random scenes (boxes of ~40 px in clusters, many overlaps near IoU 0.3): the appended ONNX ops keep
    exactly the runtime's faces (upstream's +1 pixel included); the plain op (area_pixel=0) does not always."""
    pytest.importorskip("onnx")
    p = 200
    rules = FaceBoxesDetector(lambda b: (b, b))
    sessions = {px: _nms_session(p, px) for px in (1.0, 0.0)}
    plain_differs = 0
    for seed in range(15):
        rng = np.random.default_rng(seed)
        centres = rng.uniform(0, 640, (6, 2))
        c = centres[rng.integers(0, 6, p)] + rng.normal(0, 6, (p, 2))
        wh = 40 * np.exp(rng.normal(0, 0.2, (p, 2)))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
        scores = rng.uniform(0, 1, p).astype(np.float32)
        want = rules._select(boxes, scores)
        got_boxes, got_scores = sessions[1.0].run(None, {"b": boxes, "s": scores})
        np.testing.assert_array_equal(got_boxes, want[:, :4])
        np.testing.assert_array_equal(got_scores, want[:, 4])
        plain, _ = sessions[0.0].run(None, {"b": boxes, "s": scores})
        plain_differs += int(plain.shape != got_boxes.shape or not np.array_equal(plain, got_boxes))
    assert plain_differs > 0  # the +1 pixel matters in such scenes: the test can tell the two apart


# ------------------------------------------------------------------------------------------------ converted
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The mb05 int8 regressor bundle and the FaceBoxes bundle, default options, converted once."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from edge3dfa.converters import convert

    out = tmp_path_factory.mktemp("bundles")
    (reg,) = convert("mb05", to="onnx", precision="int8", out_dir=out, bundle=True, verbose=False, parity_count=16)
    (det,) = convert("faceboxes", to="onnx", precision="fp32", out_dir=out, bundle=True, verbose=False,
                     landmarks_with=None)
    return reg, det


@pytest.mark.slow
def test_int8_bundle_is_within_half_a_pixel_of_the_spec(bundles) -> None:
    """Only the network is int8: the bundle's landmarks vs the spec of the PyTorch params on crops parity did not
    use, mean <= 0.5 px (the issue's int8 target); the pre-processing and the /head/ nodes have no quantized input."""
    import onnx

    from edge3dfa.models import Checkpoint
    from edge3dfa.target import open_target

    reg, _ = bundles
    t = open_target(reg.path, threads=1)
    assert t.stored_precision() == "quantized" and t.bundle == bundle.regressor_contract()
    x = eval_crops(200, 64)
    spec = bundle.reference(Checkpoint.open("mb05").target(1).predict(x))
    got = t.predict_bundle(x)
    assert np.linalg.norm(got["landmarks"] - spec["landmarks"], axis=2).mean() <= 0.5
    graph = onnx.load(str(reg.path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    float_nodes = [n for n in graph.node if n.name.startswith("/head/") or n.name in ("/Cast", "/Transpose", "/Sub",
                                                                                      "/Mul")]
    assert len(float_nodes) > 50 and {"Cast", "Transpose", "Sub", "Mul"} <= {n.op_type for n in float_nodes}
    assert not [n.name for n in float_nodes if any(made_by.get(i) == "DequantizeLinear" for i in n.input)]
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)


@pytest.mark.slow
def test_detector_bundle_finds_the_runtimes_faces(bundles) -> None:
    """The FaceBoxes bundle (decode + NMS in the graph) vs the runtime's decode + NMS over PyTorch FaceBoxes at the
    same 480x640 input: same faces on the example photos, IoU >= 0.99; the contract is in the file."""
    import onnx

    from edge3dfa import assets, runtime
    from edge3dfa.models import Checkpoint
    from edge3dfa.target import open_target

    _, det = bundles
    t = open_target(det.path, threads=1)
    assert t.bundle == det.manifest.bundle and t.bundle["nms"].startswith("in the model")
    reference = Checkpoint.open("faceboxes").target(1)
    spec = FaceBoxesDetector(lambda b: tuple(reference.run(b)[:2]), input_size=SIZE)
    mine = FaceBoxesDetector.of_target(t)
    for name in ("trump_hillary", "emma"):
        img = runtime.read_image(assets.fetch(name))
        want, got = spec(img), mine(img)
        assert len(want) == len(got) > 0, name
        assert box_iou(want, got).max(axis=1).min() >= 0.99, name
        assert det.manifest.parity[f"photo {name}"]["box_min_iou"] >= 0.99
    model = onnx.load(str(det.path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edge3dfa.bundle"]) == t.bundle and "edge3dfa.version" in meta
    assert "FaceBoxes" in meta["edge3dfa.licence"]
    assert any(n.op_type == "NonMaxSuppression" for n in model.graph.node)
    docs = {v.name: v.doc_string for v in [*model.graph.input, *model.graph.output]}
    assert set(docs) == {"image", "boxes", "scores"} and "input pixels" in docs["boxes"] and "uint8" in docs["image"]


@pytest.mark.slow
def test_run_with_both_bundles(bundles, tmp_path) -> None:
    """``edge3dfa run --artifact REGRESSOR_BUNDLE --detector DETECTOR_BUNDLE photo``: exit 0, both faces, files."""
    from edge3dfa import assets

    reg, det = bundles
    r = run_cli("run", "--artifact", reg.path, "--detector", det.path, "--out-dir", tmp_path, "--threads", "1",
                assets.fetch("trump_hillary"))
    assert r.returncode == 0, r.stderr
    faces = json.loads((tmp_path / "trump_hillary.json").read_text())["faces"]
    assert len(faces) == 2 and (tmp_path / "trump_hillary_overlay.png").stat().st_size > 0


@pytest.mark.slow
def test_tampered_contract_is_refused(bundles, tmp_path) -> None:
    """The file's contract edited (its channel order), the manifest's sha256 updated so only the contract
    disagrees: ``run`` refuses with one line, exit 2."""
    import onnx

    from edge3dfa import assets

    _, det = bundles
    path = tmp_path / det.path.name
    model = onnx.load(str(det.path))
    for prop in model.metadata_props:
        if prop.key == "edge3dfa.bundle":
            terms = json.loads(prop.value)
            terms["input"]["channel_order"] = "RGB"
            prop.value = json.dumps(terms, sort_keys=True)
    onnx.save_model(model, str(path))
    manifest = json.loads(det.path.with_suffix(".json").read_text())
    manifest["artifact_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(manifest))
    r = run_cli("run", "--detector", path, "--out-dir", tmp_path, assets.fetch("trump_hillary"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "contract stored in the file" in r.stderr


@pytest.mark.slow
def test_dynamic_int8_keeps_excluded_gemms_float(tmp_path) -> None:
    """Dynamic quantization rewrites each Gemm into NAME_MatMul after reading the exclusions, so the float params
    layer (float_output) and a bundle's fused head MatMul + Add were quantized anyway: the dyn-int8 bundle's
    landmarks were 0.013 px (mean) from what its own params give. Now no excluded Gemm is quantized, and the head
    is float rounding away from the spec of its own params."""
    import onnx

    from edge3dfa.converters import convert
    from edge3dfa.measure.parity import head_departure
    from edge3dfa.measure.predict import predict_bundle_all
    from edge3dfa.target import open_target

    out = {}
    for bundled in (None, True):
        (art,) = convert("mb05", to="onnx", precision="dyn-int8", out_dir=tmp_path, bundle=bundled, verbose=False,
                         parity_count=8)
        out[bundled] = art
    for art in out.values():
        nodes = onnx.load(str(art.path)).graph.node
        quantized = {n.name for n in nodes if n.op_type in ("MatMulInteger", "ConvInteger")}
        for name in art.manifest.options["excluded_nodes"]:
            assert not any(q.startswith(f"{name}_MatMul") for q in quantized), name
    head = head_departure(predict_bundle_all(open_target(out[True].path, threads=1), eval_crops(300, 32)))
    assert head["landmark_mean_px"] <= 0.01
