"""MobileNet-V3 large mode (the 3DDFA_V2 paper's "MobileNet-V3 x0.5") through every converter in fp32.

Two checkpoints, arch and width inferred from the file: the distilled large x0.5 fixture (real activations,
assets fixtures/README.md) and an upstream-format large x0.75 checkpoint with seeded random weights and
BatchNorm statistics (another width; BN folding cannot hide behind identity statistics). Each is converted
once per format (module fixture) and compared with its PyTorch model on AFLW2000-3D crops; CoreML runs
through the numpy MIL evaluator on the saved package, as on any Linux CI.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge3dfa import assets, runtime  # noqa: E402
from edge3dfa.converters import get_format  # noqa: E402
from edge3dfa.datasets.calibration import load_eval_crops  # noqa: E402
from edge3dfa.models import build_model, randomize_  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402
from edge3dfa.target import open_target  # noqa: E402
from edge3dfa.targets.torch import TorchTarget  # noqa: E402

N = 8  # AFLW2000-3D crops per comparison (first in protocol order)
FRAMEWORK = {"onnx": "onnxruntime", "tflite": "litert_torch", "coreml": "coremltools"}


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return load_eval_crops(N)


@pytest.fixture(scope="module")
def random_model() -> torch.nn.Module:
    return randomize_(build_model("mobilenet_v3_large", 0.75), seed=11).eval()


@pytest.fixture(scope="module")
def sources(random_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    path = tmp_path_factory.mktemp("ckpt") / "mbv3_large_075_random.pth"
    sd = {f"module.{k}": v for k, v in random_model.state_dict().items()}  # as upstream's DataParallel saves it
    torch.save({"epoch": 1, "state_dict": sd}, path)
    return {"fixture": Checkpoint.open(assets.fetch("mbv3_large_05_distilled")), "random_x0.75": Checkpoint.open(path)}


@pytest.fixture(scope="module", params=list(FRAMEWORK))
def converted(request: pytest.FixtureRequest, sources: dict[str, Checkpoint],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    fmt = request.param
    pytest.importorskip(FRAMEWORK[fmt])
    form = get_format(fmt)
    out = tmp_path_factory.mktemp(fmt)
    arts = {}
    for name, src in sources.items():
        dest = out / f"{name}_fp32{form.suffix}"
        info = form.write(src, dest, "fp32", form.Options(), None)
        arts[name] = (dest, info)
    return fmt, arts


def test_sources_are_inferred_as_large_mode(sources: dict[str, Checkpoint], random_model: torch.nn.Module,
                                           crops: np.ndarray) -> None:
    assert (sources["fixture"].arch, sources["fixture"].widen_factor) == ("mobilenet_v3_large", 0.5)
    assert (sources["random_x0.75"].arch, sources["random_x0.75"].widen_factor) == ("mobilenet_v3_large", 0.75)
    x = torch.from_numpy(crops[:2])
    with torch.no_grad():  # the checkpoint round trip gives back the very network that was saved
        assert torch.equal(sources["random_x0.75"].load()(x), random_model(x))


def _landmarks_px(params: np.ndarray) -> np.ndarray:
    roi = np.tile(np.array([[0, 0, 120, 120]], np.float32), (len(params), 1))
    return runtime.landmarks(params, roi)[:, :2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fixture", "random_x0.75"])
def test_fp32_parity(converted: tuple[str, dict], sources: dict[str, Checkpoint], crops: np.ndarray, name: str) -> None:
    fmt, arts = converted
    path, _ = arts[name]
    ref = TorchTarget(threads=2, model=sources[name].load()).predict(crops)
    got = open_target(path, threads=2).predict(crops)
    err = np.abs(got - ref).max()
    print(f"\n{fmt} fp32 {name}: params max abs err {err:.2e} (|ref| max {np.abs(ref).max():.2f})")
    assert err <= 1e-4
    if name == "fixture":  # normalised 3DMM params: landmarks in the crop must agree to well under a pixel
        assert np.linalg.norm(_landmarks_px(got) - _landmarks_px(ref), axis=1).max() <= 0.01


# Upstream's large table: hard-swish after the stem, twice in each of the 9 'HS' blocks (7-15), after the last
# conv and after the head conv; squeeze-excite (a global pool and a hard-sigmoid) in blocks 4-6 and 11-15.
HS, SE = 1 + 2 * 9 + 1 + 1, 3 + 5
EXPECTED_OPS = {
    "onnx": {"Clip": HS + SE, "GlobalAveragePool": SE + 1},  # hard-swish and hard-sigmoid are written as clamps
    "coreml": {"clip": HS + SE, "reduce_mean": SE + 1},
    # no op of the SE's hard-sigmoid is left but a MUL (its clamp fuses into the conv before it), then x * s
    "tflite": {"HARD_SWISH": HS, "MUL": 2 * SE, "MEAN": SE + 1},
}


@pytest.mark.slow
def test_graph_keeps_hard_swish_and_squeeze_excite(converted: tuple[str, dict]) -> None:
    """Every hard-swish, SE block and the final pooling reach the artifact, counted in its own op names."""
    fmt, arts = converted
    path, info = arts["fixture"]
    if fmt == "onnx":
        import onnx

        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    elif fmt == "tflite":
        graph = next(n for n in info["notes"] if n.startswith("graph"))  # "graph: N ops (CONV_2D 49, ...)"
        ops = [op for part in graph.split("(", 1)[1].split(")")[0].split(", ")
               for op in [part.split()[0]] * int(part.split()[1])]
    else:
        from edge3dfa.targets.mil_eval import load_program

        ops = [op.op_type for op in load_program(path).functions["main"].operations]
    assert {op: ops.count(op) for op in EXPECTED_OPS[fmt]} == EXPECTED_OPS[fmt]
