"""CoreML phone bundles (``edge3dfa.converters.coreml.bundle``) against the executable spec: the numpy runtime's
landmarks and pose (``edge3dfa.bundle.reference`` of PyTorch's params) and its FaceBoxes decode + NMS.

The packages are run by the numpy MIL evaluator (CoreML predict needs macOS), fed as CoreML feeds an ImageType:
an RGB image turned into planes in the input's color layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge3dfa import bundle
from edge3dfa.errors import Edge3dfaError

pytest.importorskip("coremltools")
pytest.importorskip("torch")

from conftest import eval_crops  # noqa: E402


def _wrap(deg: np.ndarray) -> np.ndarray:
    return (deg + 180.0) % 360.0 - 180.0


def _errors(got: dict[str, np.ndarray], ref_params: np.ndarray) -> tuple[float, float]:
    """(mean 3-D landmark distance in crop px, max pose difference in degrees) vs the spec."""
    spec = bundle.reference(ref_params)
    px = np.linalg.norm(got["landmarks"].astype(np.float64) - spec["landmarks"], axis=2).mean()
    return float(px), float(np.abs(_wrap(got["pose"].astype(np.float64) - spec["pose"])).max())


@pytest.fixture(scope="module")
def crops_and_reference():
    from edge3dfa.models import Checkpoint

    x = eval_crops(200, 32)
    return x, Checkpoint.open("mb05").target(1).predict(x)


def test_coreml_bundles_it_can_build_and_refuses_the_rest():
    from edge3dfa.converters import get_format

    fmt = get_format("coreml")
    opts = fmt.Options.parse({})
    assert fmt.bundles
    fmt.check_bundle("fp32", False, opts)
    fmt.check_bundle("int8", False, opts)
    fmt.check_bundle("fp32", True, opts)
    with pytest.raises(Edge3dfaError, match="fp32 and int8, not fp16"):
        fmt.check_bundle("fp16", False, opts)
    with pytest.raises(Edge3dfaError, match="detector bundles are built at fp32"):
        fmt.check_bundle("int8", True, opts)
    with pytest.raises(Edge3dfaError, match="route=trace"):
        fmt.check_bundle("fp32", False, fmt.Options.parse({"route": "export"}))


@pytest.fixture(scope="module")
def rgb_fp32(tmp_path_factory):
    from edge3dfa.converters import convert

    (art,) = convert("mb05", to="coreml", precision="fp32", out_dir=tmp_path_factory.mktemp("coreml_bundle"),
                     bundle={"channels": "rgb"}, verbose=False, parity_count=8)
    return art


@pytest.mark.slow
def test_fp32_bundle_equals_the_spec_and_carries_its_contract(rgb_fp32, crops_and_reference):
    """landmarks mean <= 0.01 px and pose <= 0.05 deg vs the runtime on 32 AFLW2000-3D crops; the contract in the
    package (user-defined metadata, descriptions, licence, version) is the manifest's and is read back."""
    import coremltools as ct

    from edge3dfa import __version__
    from edge3dfa.target import open_target

    x, ref = crops_and_reference
    art = rgb_fp32
    assert art.path.name == "mb05_fp32_bundle.mlpackage"
    t = open_target(art.path, threads=1)  # checks the file's contract against the manifest's
    assert t.bundle == art.manifest.bundle == bundle.regressor_contract("rgb", layout="image")
    assert t.input_contract() == {"shape": [1, 120, 120], "layout": "image", "dtype": "uint8", "kind": "image"}
    px, deg = _errors(t.predict_bundle(x), ref)
    assert px <= 0.01 and deg <= 0.05, (px, deg)
    np.testing.assert_allclose(t.predict(x), ref, atol=1e-4)
    assert art.manifest.parity["aflw2000"]["bundle_landmark_mean_px"] <= 0.01

    spec = ct.models.MLModel(str(art.path), skip_model_load=True).get_spec()
    d = spec.description
    assert [i.name for i in d.input] == ["image"] and [o.name for o in d.output] == list(bundle.OUTPUTS)
    image = d.input[0].type.imageType
    assert (image.width, image.height) == (120, 120)
    assert image.ColorSpace.Name(image.colorSpace) == "RGB"
    assert json.loads(d.metadata.userDefined["edge3dfa.bundle"]) == art.manifest.bundle
    assert d.metadata.license == bundle.LICENCE["regressor"] and d.metadata.versionString == __version__
    assert "crop pixels" in d.output[0].shortDescription and "degrees" in d.output[1].shortDescription
    assert any("Neural Engine" in n for n in art.manifest.notes)


@pytest.mark.slow
def test_rgb_bundle_needs_rgb_planes(rgb_fp32, crops_and_reference):
    """The channel order is real: the RGB bundle's program fed BGR planes (the order swapped) is far off the spec,
    fed RGB planes (what CoreML gives an RGB input) it is the spec."""
    from edge3dfa.targets.mil_eval import MILEvaluator

    x, ref = crops_and_reference
    ev = MILEvaluator.from_package(rgb_fp32.path)
    bgr = bundle.to_image_uint8(x[:4], "bgr", "NCHW").astype(np.float32)
    outs = {"right": [ev({"image": bgr[i:i + 1, ::-1]}) for i in range(4)],
            "swapped": [ev({"image": bgr[i:i + 1]}) for i in range(4)]}
    err = {k: _errors({n: np.concatenate([o[n] for o in v]) for n in bundle.OUTPUTS}, ref[:4])[0]
           for k, v in outs.items()}
    assert err["right"] <= 0.01 and err["swapped"] > 0.5, err


@pytest.mark.slow
def test_int8_bundle_within_half_a_pixel(tmp_path, crops_and_reference):
    """w8a8 on the network only (BGR bundle): landmarks mean <= 0.5 px vs the spec of PyTorch's params; the
    pre/post-processing has no quantize/dequantize pair and computes in float32."""
    from edge3dfa.bundle import BundleOptions
    from edge3dfa.converters import get_format, load_calibration_set
    from edge3dfa.models import Checkpoint
    from edge3dfa.targets.coreml import CoreMLTarget
    from edge3dfa.targets.mil_eval import load_program

    x, ref = crops_and_reference
    fmt = get_format("coreml")
    dest = tmp_path / "mb05_int8_bundle.mlpackage"
    fields = fmt.write(Checkpoint.open("mb05").bundled(BundleOptions()), dest, "int8", fmt.Options.parse({}),
                       load_calibration_set(None))
    t = CoreMLTarget(dest, threads=1)
    assert t.stored_precision() == "quantized" and t.bundle == fields["bundle"]
    px, _ = _errors(t.predict_bundle(x), ref)
    assert px <= 0.5, px
    ops = list(load_program(dest).functions["main"].operations)
    last_dequantize = max(i for i, op in enumerate(ops) if op.op_type == "dequantize")
    tail = [op for op in ops[last_dequantize + 1:] if op.op_type not in ("const",)]
    assert any(op.op_type == "atan" for op in tail)  # the pose comes after the last int8 tensor
    assert all(str(v.dtype.__name__) != "fp16" for op in tail if op.op_type in ("atan", "matmul", "select")
               for v in op.outputs)


@pytest.mark.slow
def test_detector_bundle_boxes_equal_the_runtime(tmp_path):
    """FaceBoxes with decoding and MIL NMS in the program vs the runtime's decode + NMS at the same 480x640 input,
    on upstream's example photos: the same faces, each box IoU >= 0.99."""
    from edge3dfa import assets, runtime
    from edge3dfa.bundle import BundleOptions
    from edge3dfa.converters import get_format
    from edge3dfa.models import Checkpoint
    from edge3dfa.runtime.detect import FaceBoxesDetector, box_iou, prepare
    from edge3dfa.targets.coreml import CoreMLTarget

    fmt = get_format("coreml")
    dest = tmp_path / "faceboxes_fp32_bundle.mlpackage"
    fmt.write(Checkpoint.open("faceboxes").bundled(BundleOptions()), dest, "fp32", fmt.Options.parse({}), None)
    t = CoreMLTarget(dest, threads=1)
    assert t.output_names == list(bundle.DETECTOR_OUTPUTS) and t.bundle["kind"] == "detector"
    torch_net = Checkpoint.open("faceboxes").target(1)
    reference = FaceBoxesDetector(lambda blob: tuple(torch_net.run(blob)[:2]), input_size=(480, 640))
    for photo in ("trump_hillary", "emma"):
        img = runtime.read_image(assets.fetch(photo))
        want = reference(img)
        blob, scale = prepare(img, (480, 640))
        boxes, scores = t.run(blob)
        assert len(boxes) == len(want) >= 2, photo
        assert np.all(np.diag(box_iou(want, boxes / scale)) >= 0.99), photo
        np.testing.assert_allclose(scores, want[:, 4], atol=1e-4)
