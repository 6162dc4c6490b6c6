"""ExecuTorch phone bundles (fp32 and int8): the .pte takes uint8 NHWC crops, returns landmarks, pose and params in
that order, carries its contract as a constant method, and matches the executable spec (``edge3dfa.bundle.reference``
of the PyTorch params, an independent numpy path) on AFLW2000-3D crops read with OpenCV.

Both bundles are converted once for the module (the slow part: two XNNPACK lowerings and an int8 calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from edge3dfa import bundle
from edge3dfa.errors import Edge3dfaError

pytest.importorskip("executorch")
pytest.importorskip("torch")

from conftest import eval_crops  # noqa: E402

#: 40 crops: more than the default capacity (32), so the target also runs a batch in two chunks
N_CROPS = 40


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict:
    from edge3dfa.converters import convert

    out = tmp_path_factory.mktemp("et_bundle")
    made = convert("mb05", to="executorch", precision=["fp32", "int8"], out_dir=out, bundle=True, verbose=False,
                   parity_count=16, threads=1)
    return {a.manifest.precision: a for a in made}


@pytest.fixture(scope="module")
def reference() -> dict:
    from edge3dfa.models import Checkpoint

    x = eval_crops(100, N_CROPS)
    params = Checkpoint.open("mb05").target(1).predict(x)
    return {"x": x, "params": params, "spec": bundle.reference(params)}


def _landmark_px(got: dict, spec: dict) -> float:
    return float(np.linalg.norm(got["landmarks"].astype(np.float64) - spec["landmarks"], axis=2).mean())


@pytest.mark.slow
def test_fp32_bundle_equals_the_spec(arts, reference) -> None:
    """fp32 within the issue's targets (landmarks mean <= 0.01 px, pose <= 0.05 degrees) on a batch of 40
    (two chunks); params normalised back equal PyTorch's."""
    from edge3dfa.target import open_target

    art = arts["fp32"]
    assert art.path.name == "mb05_fp32_bundle.pte"
    t = open_target(art.path, threads=1)
    assert t.input_contract() == {"shape": [None, 120, 120, 3], "layout": "NHWC", "dtype": "uint8", "kind": "tensor"}
    got, spec = t.predict_bundle(reference["x"]), reference["spec"]
    assert got["landmarks"].shape == (N_CROPS, 68, 3)
    assert _landmark_px(got, spec) <= 0.01
    assert np.abs(got["pose"] - spec["pose"]).max() <= 0.05
    np.testing.assert_allclose(t.predict(reference["x"]), reference["params"], atol=1e-4)
    one = t.predict_bundle(reference["x"][:1])  # batch 1 equals the first row of the batch of 40
    np.testing.assert_allclose(one["landmarks"][0], got["landmarks"][0], atol=1e-3)
    assert art.manifest.parity["aflw2000"]["bundle_landmark_mean_px"] <= 0.01


@pytest.mark.slow
def test_int8_bundle_quantizes_the_network_only(arts, reference) -> None:
    """int8 landmarks within 0.5 px (mean) of the spec of PyTorch; the head stays float: the bundle's landmarks
    and pose equal the spec of its own (int8) params, which a quantized head would miss."""
    from edge3dfa.target import open_target

    art = arts["int8"]
    t = open_target(art.path, threads=1)
    got = t.predict_bundle(reference["x"])
    assert _landmark_px(got, reference["spec"]) <= 0.5
    own = bundle.reference(bundle.normalised_params(got["params"]))
    assert _landmark_px(got, own) <= 0.01
    assert np.abs(got["pose"] - own["pose"]).max() <= 0.05
    delegation = art.manifest.options["delegation"]
    assert any("quantize" in op for op in delegation["delegated"])  # the int8 network is in the XNNPACK delegate
    assert any("portable CPU kernels" in n for n in art.manifest.notes)
    used = art.manifest.options  # the int8 choices the network was built with, as in the params artifact
    assert used["bias_correction"] == "auto" and used["hard_swish"] == "int8"
    assert used["bias_correction_judge"]["heldout_faces"] > 0


def test_bundle_calibration_keeps_where_the_crops_came_from() -> None:
    """The bundle's int8 builder gets a CalibrationSet (folder, files), not a bare array: bias_correction=auto judges
    on the pool crops calibration leaves (datasets.heldout.heldout_for), which a bare array cannot tell."""
    from edge3dfa.converters.executorch import bundle_calibration
    from edge3dfa.datasets.calibration import load_calibration

    calib = load_calibration(None, count=8)
    got = bundle_calibration(calib)
    assert got.files == calib.files and got.folder == calib.folder
    np.testing.assert_array_equal(got.data, calib.data)  # normalised uint8 crops survive the round trip exactly


@pytest.mark.slow
def test_contract_travels_inside_the_program(arts) -> None:
    """Without the manifest, the target reads the contract from the program's 'contract' method (equal to the
    manifest's field); the output order is a constant method too; a bundle without a contract refuses to run."""
    from edge3dfa.targets.executorch import ExecuTorchTarget

    for art in arts.values():
        t = ExecuTorchTarget(art.path, threads=1)
        assert t.bundle == art.manifest.bundle == bundle.regressor_contract("bgr", "NHWC")
        names = t.program.load_method("output_names").execute([])[0]
        assert names.split(",") == list(bundle.OUTPUTS)
        assert t.program.load_method("precision").execute([])[0] == art.manifest.precision


@pytest.mark.slow
def test_a_bundle_program_without_its_contract_method(tmp_path) -> None:
    """A uint8 program with the bundle's outputs but no 'contract' method opens (uint8 NHWC input), refuses to
    run until a contract is given (``open_target`` takes it from the manifest), then returns the outputs in order."""
    import torch

    from edge3dfa.converters.executorch import exported_bundle, lower
    from edge3dfa.targets.executorch import ExecuTorchTarget

    class Fake(torch.nn.Module):  # each output: the image's mean pixel, in the bundle's shapes
        def forward(self, image: torch.Tensor) -> tuple:
            m = image.to(torch.float32).mean((1, 2, 3)).reshape(-1, 1)
            return (m.reshape(-1, 1, 1) * torch.ones(1, 68, 3), m * torch.ones(1, 3), m * torch.ones(1, 62))

    content, _ = lower(exported_bundle(Fake().eval(), 1))
    (tmp_path / "fake.pte").write_bytes(content)
    t = ExecuTorchTarget(tmp_path / "fake.pte", threads=1)
    assert t.bundle is None and t.input_contract()["dtype"] == "uint8" and t.capacity == 1
    x = eval_crops(0, 6)
    with pytest.raises(Edge3dfaError, match="without its contract"):
        t.run(x)
    t.bundle = bundle.regressor_contract()
    got = t.predict_bundle(x)  # 6 crops, one at a time (capacity 1)
    means = bundle.to_image_uint8(x).astype(np.float64).mean((1, 2, 3))
    np.testing.assert_allclose(got["pose"], np.repeat(means[:, None], 3, 1), rtol=1e-5)
    np.testing.assert_allclose(got["landmarks"][:, 67, 2], means, rtol=1e-5)


def test_detector_and_fp16_bundles_are_refused() -> None:
    from edge3dfa.converters import plan

    with pytest.raises(Edge3dfaError, match="executorch"):
        plan("faceboxes", "executorch", "fp32", bundle=True)
    with pytest.raises(Edge3dfaError, match="fp16 is not bundled"):
        plan("mb05", "executorch", "fp16", bundle=True)


def test_bundle_calibration_is_the_uint8_images_exactly() -> None:
    """Calibration crops go through uint8 exactly (the values the bundle's pre-processing makes of the images);
    crops off the uint8 grid are a user error, not silently rounded."""
    from edge3dfa.converters.executorch import bundle_calibration

    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 120, 120)).astype(np.float64)
    x = ((pixels - 127.5) / 128).astype(np.float32)  # independent of edge3dfa's normalisation
    np.testing.assert_array_equal(bundle_calibration(x), x)
    with pytest.raises(Edge3dfaError, match="calibrated on uint8 images"):
        bundle_calibration(x + np.float32(0.001))
