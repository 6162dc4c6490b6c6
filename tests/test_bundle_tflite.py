"""TFLite phone bundles: the file's names and stored contract, its outputs against the executable spec
(``edge3dfa.bundle.reference`` of PyTorch's params; ``runtime.detect.decode`` of PyTorch's FaceBoxes offsets), and
the GPU delegate's view of the fused pre- and post-processing."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge3dfa import bundle

pytest.importorskip("ai_edge_litert")

from conftest import eval_crops  # noqa: E402


def _spec(x: np.ndarray) -> dict[str, np.ndarray]:
    from edge3dfa.models import Checkpoint

    return bundle.reference(Checkpoint.open("mb05").target(1).predict(x))


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("litert_torch")
    from edge3dfa.converters import convert

    (art,) = convert("mb05", to="tflite", precision="fp32", out_dir=tmp_path_factory.mktemp("b"), bundle=True,
                     verbose=False, parity_count=16)
    return art


# --------------------------------------------------------------------------------------------- fast: the rules


def _t(dtype: type, shape: list[int], const: bool = False) -> dict:
    return {"dtype": np.dtype(dtype), "shape": shape, "const": const}


def test_gpu_rules_follow_tensorflows_table() -> None:
    """A few verdicts of tensorflow/lite/tools/versioning/gpu_compatibility.cc, written out by hand: the CAST
    type pairs, SLICE's rank, an op the delegate lacks, reductions with constant int32 axes."""
    from edge3dfa.converters.tflite.gpu import _op_problem

    f32 = _t(np.float32, [1, 3, 4])
    assert _op_problem("CAST", [_t(np.uint8, [1, 8, 8, 3])], [_t(np.float32, [1, 8, 8, 3])])
    assert _op_problem("CAST", [_t(np.float32, [4])], [_t(np.int32, [4])]) is None
    assert _op_problem("CAST", [_t(np.bool_, [4])], [_t(np.float32, [4])]) is None
    assert _op_problem("SLICE", [_t(np.float32, [1, 62]), _t(np.int32, [2], True), _t(np.int32, [2], True)],
                       [_t(np.float32, [1, 12])])
    assert _op_problem("SLICE", [f32, _t(np.int32, [3], True), _t(np.int32, [3], True)], [f32]) is None
    assert _op_problem("LOGICAL_OR", [_t(np.bool_, [1]), _t(np.bool_, [1])], [_t(np.bool_, [1])])
    assert _op_problem("ATAN2", [f32, f32], [f32]) is None
    assert _op_problem("SUM", [f32, _t(np.int32, [1], True)], [f32]) is None
    assert _op_problem("SUM", [f32, _t(np.int32, [1])], [f32])
    assert _op_problem("NON_MAX_SUPPRESSION_V5", [f32], [f32])


# --------------------------------------------------------------------------------------------- slow: real files


@pytest.mark.slow
def test_fp32_bundle_names_contract_and_spec(fp32_bundle) -> None:
    """The signature and its tensors carry the contract's names; the contract read back from the file is the
    manifest's and ``bundle.regressor_contract``'s; outputs equal the spec (landmarks mean <= 0.01 px, pose <= 0.05
    degrees) and predict() gives PyTorch's params."""
    from edge3dfa.converters.tflite.bundle import PROVENANCE_NAME
    from edge3dfa.target import open_target
    from edge3dfa.targets.tflite import metadata_entry

    art = fp32_bundle
    assert art.path.name == "mb05_fp32_bundle.tflite"
    t = open_target(art.path, threads=1)
    sig = t.interpreter.get_signature_list()
    assert list(sig) == ["regressor"] and sig["regressor"]["inputs"] == ["image"]
    assert sorted(sig["regressor"]["outputs"]) == sorted(bundle.OUTPUTS)
    assert [d["name"] for d in t.interpreter.get_input_details()] == ["image"]
    assert sorted(d["name"] for d in t.interpreter.get_output_details()) == sorted(bundle.OUTPUTS)
    assert t.bundle == art.manifest.bundle == bundle.regressor_contract("bgr", "NHWC")
    assert "BFM" in t.bundle["licence"] and t.bundle["version"] == bundle.CONTRACT_VERSION
    from edge3dfa import __version__

    stored = json.loads(metadata_entry(art.path.read_bytes(), PROVENANCE_NAME))
    assert stored["edge3dfa_version"] == __version__ and stored["precision"] == "fp32"
    assert t.input_contract() == {"shape": [1, 120, 120, 3], "layout": "NHWC", "dtype": "uint8", "kind": "tensor"}

    x = eval_crops(100, 48)
    got, spec = t.predict_bundle(x), _spec(x)
    assert np.linalg.norm(got["landmarks"] - spec["landmarks"], axis=2).mean() <= 0.01
    assert np.abs(got["pose"] - spec["pose"]).max() <= 0.05
    np.testing.assert_allclose(bundle.normalised_params(got["params"]), bundle.normalised_params(spec["params"]),
                               atol=1e-4)
    for name in ("aflw2000", "calibration"):
        assert art.manifest.parity[name]["bundle_landmark_mean_px"] <= 0.01


@pytest.mark.slow
def test_gpu_check_names_the_post_processing_ops(fp32_bundle, tmp_path) -> None:
    """LiteRT's analyzer reads the file (its signature dump names 'image' and the outputs); by TensorFlow's GPU
    rules only ops outside the network fall back (the uint8 CAST, 2-D SLICEs of the params; no LOGICAL_OR since
    the pose's gimbal test is one ABS + GREATER), the plain params artifact has none, and the manifest says so and
    points to the params artifact."""
    from edge3dfa.converters import convert
    from edge3dfa.converters.tflite import gpu
    from edge3dfa.converters.tflite.bundle import in_network
    from edge3dfa.converters.tflite.int8 import _graph_ops, _interpreter

    content = fp32_bundle.path.read_bytes()
    report = gpu.analyzer_report(content)
    assert "key: 'regressor'" in report and "'image'" in report and "'landmarks'" in report
    findings = gpu.gpu_findings(content)
    kinds = {name for _, name, _ in findings}
    assert "CAST" in kinds and "LOGICAL_OR" not in kinds
    interp = _interpreter(content)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    ops = {op["index"]: op for op in _graph_ops(interp)}
    assert not [i for i, _, _ in findings if in_network(names[ops[i]["outputs"][0]])]
    note = next(n for n in fp32_bundle.manifest.notes if n.startswith("GPU delegate"))
    assert "CAST from uint8 to float32" in note and "params artifact" in note

    (params,) = convert("mb05", to="tflite", precision="fp32", out_dir=tmp_path, verbose=False, parity_count=8)
    assert gpu.gpu_findings(params.path.read_bytes()) == []


@pytest.mark.slow
def test_int8_bundle_quantizes_the_network_only(tmp_path) -> None:
    """int8 bundle: one int8 region (one QUANTIZE, one DEQUANTIZE), the uint8 image cast to float before it, float
    outputs; landmarks within 0.5 px (mean, 2-D and 3-D) of the spec of PyTorch's params."""
    pytest.importorskip("litert_torch")
    from edge3dfa.converters import convert
    from edge3dfa.converters.tflite.opversions import inspect_ops
    from edge3dfa.target import open_target

    (art,) = convert("mb05", to="tflite", precision="int8", out_dir=tmp_path, bundle=True, verbose=False,
                     parity_count=16)
    ops = inspect_ops(art.path.read_bytes())[1]["ops"]
    assert ops.get("QUANTIZE") == 1 and ops.get("DEQUANTIZE") == 1 and ops.get("CAST") == 1
    t = open_target(art.path, threads=2)
    assert all(d["dtype"] == np.float32 for d in t.interpreter.get_output_details())
    assert t.stored_precision() == "quantized" and t.bundle == art.manifest.bundle
    x = eval_crops(0, 100)
    got, spec = t.predict_bundle(x), _spec(x)
    d = got["landmarks"] - spec["landmarks"]
    assert np.linalg.norm(d[..., :2], axis=2).mean() <= 0.5
    assert np.linalg.norm(d, axis=2).mean() <= 0.5


@pytest.mark.slow
def test_detector_bundle_boxes_equal_the_runtime_decode(tmp_path) -> None:
    """FaceBoxes bundle on the example photos: its boxes and scores equal ``runtime.detect.decode`` of PyTorch's
    offsets on the same blob, and the faces after the runtime's NMS match one to one at IoU >= 0.99."""
    pytest.importorskip("litert_torch")
    from edge3dfa.assets import fetch
    from edge3dfa.bundle import BundleOptions
    from edge3dfa.converters.tflite import TFLiteFormat, TFLiteOptions
    from edge3dfa.models import Checkpoint
    from edge3dfa.models.faceboxes import load_faceboxes, torch_forward
    from edge3dfa.runtime.detect import FaceBoxesDetector, box_iou, decode, prepare, prior_boxes
    from edge3dfa.targets.tflite import TFLiteTarget

    hw = (480, 640)
    dest = tmp_path / "faceboxes_fp32_bundle.tflite"
    # in a process that had imported cv2 and opened an interpreter, litert-torch 0.10 once merged two [P,2]
    # prior constants into one (boxes 437 px off); the priors are one [P,4] constant now, and this test runs in
    # exactly such a process
    fields = TFLiteFormat().write(Checkpoint.open("faceboxes").bundled(BundleOptions()), dest, "fp32",
                                  TFLiteOptions(), None)
    t = TFLiteTarget(dest, threads=2)
    assert t.bundle == fields["bundle"] and t.bundle["kind"] == "detector" and "not in the model" in t.bundle["nms"]
    assert t.interpreter.get_signature_list() == {"detector": {"inputs": ["image"], "outputs": ["boxes", "scores"]}}
    forward = torch_forward(load_faceboxes())
    scale = np.array([hw[1], hw[0], hw[1], hw[0]], np.float32)

    for name in ("trump_hillary", "emma"):
        img = cv2.imread(str(fetch(name)))
        blob, shrink = prepare(img, hw)
        loc, conf = forward(blob)
        want_boxes = decode(loc[0], prior_boxes(*hw)) * scale
        boxes, scores = t.run(blob)
        assert np.abs(boxes - want_boxes).max() <= 0.05 and np.abs(scores - conf[0, :, 1]).max() <= 1e-4
        want = FaceBoxesDetector(forward, input_size=hw)(img)
        got = _app_nms(boxes, scores)
        got[:, :4] /= shrink
        assert len(got) == len(want) >= 1
        assert (box_iou(got, want).max(axis=1) >= 0.99).all()


def _app_nms(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """What the contract's ``nms`` tells the app to do with a bundle's boxes and scores."""
    from edge3dfa.runtime.detect import nms

    idx = np.flatnonzero(scores > 0.05)
    idx = idx[scores[idx].argsort()[::-1][:5000]]
    dets = np.hstack([boxes[idx], scores[idx, None]]).astype(np.float32)
    dets = dets[nms(dets, 0.3)][:750]
    return dets[dets[:, 4] > 0.5]
