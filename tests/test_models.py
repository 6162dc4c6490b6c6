"""Model zoo: strict loading of real checkpoints, agreement with a third-party export, error messages, counts.

Expected numbers come from outside the code under test: the 3DDFA_V2 README (params/MACs), the assets'
fixtures/README.md (parameter counts), the StableView ONNX export of mb05, and MACs derived by hand below.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge3dfa.errors import Edge3dfaError

torch = pytest.importorskip("torch")

from edge3dfa.models import (  # noqa: E402
    MODELS,
    build_model,
    count_macs,
    count_params,
    get_spec,
    infer_arch,
    load_model,
    randomize_,
    read_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ["EDGE3DFA_ASSETS"])
MB05 = ASSETS / "upstream/3ddfa_v2/weights/mb05_120x120.pth"
MBV3_FIXTURE = ASSETS / "fixtures/mbv3_05_distilled_120x120.pth"
MBV3_LARGE_FIXTURE = ASSETS / "fixtures/mbv3_large_05_distilled_120x120.pth"
ONNX_REF = ASSETS / "reference/stableview_mb05_120x120.onnx"
UNWEIGHTED = ("mb1", "mbv3_05", "resnet22")  # mbv3_large_05: tests/test_mbv3_large.py


def _crops(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalised BGR crops as the pipeline feeds them: (pixel - 127.5) / 128."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 3, 120, 120)).astype(np.float32)
    return torch.from_numpy((pixels - 127.5) / 128.0)


@pytest.fixture(scope="module")
def mb05() -> torch.nn.Module:
    return load_model("mb05")


@pytest.fixture(scope="module", params=UNWEIGHTED)
def random_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, randomize_(build_model(request.param), seed=7).eval()


# --- real weights ---------------------------------------------------------------------------------------


def test_mb05_loads_strictly_and_is_finite(mb05: torch.nn.Module) -> None:
    assert not mb05.training
    sd = torch.load(MB05, map_location="cpu", weights_only=True)["state_dict"]
    upstream = {k.removeprefix("module.").replace("fc_param.", "fc.") for k in sd if "fc_lm." not in k}
    assert len(upstream) == len(sd) - 2 and set(mb05.state_dict()) == upstream
    with torch.no_grad():
        y = mb05(_crops())
    assert y.shape == (2, 62) and y.dtype == torch.float32
    assert torch.isfinite(y).all() and y.abs().max() > 0.05


def test_mb05_matches_stableview_onnx_export(mb05: torch.nn.Module) -> None:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(ONNX_REF), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = _crops(3, seed=1)
    ref = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ours = mb05(x).numpy()
    # The export folds BN, which reorders float32 sums: agreement to ~1e-5 is expected, 1e-4 is the bound.
    assert np.abs(ours - ref).max() < 1e-4


def test_mbv3_fixture_loads_by_path_with_inferred_arch() -> None:
    assert infer_arch(read_state_dict(MBV3_FIXTURE)) == ("mobilenet_v3_small", 0.5)
    model = load_model(MBV3_FIXTURE)
    by_name = load_model(str(MBV3_FIXTURE), arch="mbv3_05")
    assert type(model) is type(by_name) and not model.training
    # fixtures/README.md of the assets states 701,094 parameters.
    assert count_params(model) == 701_094
    with torch.no_grad():
        y = model(_crops())
    assert y.shape == (2, 62) and torch.isfinite(y).all()


def test_mbv3_large_fixture_loads_by_path_with_inferred_arch() -> None:
    assert infer_arch(read_state_dict(MBV3_LARGE_FIXTURE)) == ("mobilenet_v3_large", 0.5)
    model = load_model(MBV3_LARGE_FIXTURE)
    assert model.mode == "large" and not model.training
    by_name = load_model(str(MBV3_LARGE_FIXTURE), arch="mbv3_large_05")
    # fixtures/README.md of the assets: 1,470,870 parameters, 302 tensors (keys of upstream's module).
    assert count_params(model) == count_params(by_name) == 1_470_870
    assert len(read_state_dict(MBV3_LARGE_FIXTURE)) == 302
    x = _crops()
    with torch.no_grad():
        assert torch.equal(model(x), by_name(x))


@pytest.mark.slow
def test_mbv3_large_fixture_nme_on_500_crops_agrees_with_its_readme() -> None:
    """fixtures/README.md: balanced NME 4.38 on all 2000 AFLW2000-3D crops. 500 of them (evenly spaced) estimate
    it with sampling error: the bound is 3 standard errors of the balanced mean, computed from these 500 faces
    (per yaw bin, with the finite-population correction for drawing n of the bin's N), plus the README's rounding.
    """
    from edge3dfa import runtime
    from edge3dfa.datasets import load_crops
    from edge3dfa.measure import metrics

    data = load_crops(500)
    with torch.no_grad():
        params = load_model(MBV3_LARGE_FIXTURE)(torch.from_numpy(data.inputs)).numpy()
    errors = metrics.nme(runtime.landmarks(params, data.roi_boxes)[:, :2], data.gt)
    bins = metrics.yaw_bins(data.yaw)
    population = (1312, 383, 305)  # faces per yaw bin in all 2000 (fixtures/README.md)
    means, var = [], 0.0
    for k in range(3):
        e = errors[bins == k]
        means.append(e.mean())
        var += e.var(ddof=1) / len(e) * (1 - len(e) / population[k]) / 9
    balanced, bound = float(np.mean(means)), 3 * var ** 0.5 + 0.005
    print(f"\nmbv3 large fixture, 500 crops: balanced {balanced:.3f} vs README 4.38 (bound {bound:.3f})")
    assert abs(balanced - 4.38) <= bound


def test_mbv3_modes_do_not_load_each_other() -> None:
    # Upstream's tables: block 2 expands to 64 x 0.5 = 32 channels in large mode, make_divisible(72 x 0.5) = 40
    # in small mode, from block 1's 16 x 0.5 = 8 outputs (block 1 differs only by its SE, later in the keys).
    with pytest.raises(Edge3dfaError, match=r"features\.2\.conv\.0\.weight: checkpoint \(32, 8, 1, 1\), "
                                            r"model \(40, 8, 1, 1\)") as e:
        load_model(MBV3_LARGE_FIXTURE, arch="mbv3_05")
    assert "\n" not in str(e.value)
    with pytest.raises(Edge3dfaError, match=r"checkpoint \(40, 8, 1, 1\), model \(32, 8, 1, 1\)"):
        load_model(MBV3_FIXTURE, arch="mbv3_large_05")


def test_zoo_name_without_weights_asks_for_a_path() -> None:
    with pytest.raises(Edge3dfaError, match="mbv3_05 has no public weights; pass a checkpoint path"):
        load_model("mbv3_05")


def test_infer_arch_of_mb05_and_mb1() -> None:
    assert infer_arch(read_state_dict(MB05)) == ("mobilenet_v1", 0.5)
    assert infer_arch(build_model("mb1").state_dict()) == ("mobilenet_v1", 1.0)
    assert infer_arch(build_model("resnet22").state_dict()) == ("resnet22", 1.0)


# --- unweighted archs with random weights ---------------------------------------------------------------


def test_forward_at_120_gives_62_params(random_model: tuple[str, torch.nn.Module]) -> None:
    _, model = random_model
    with torch.no_grad():
        y = model(_crops(3))
    assert y.shape == (3, 62) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_randomize_sets_realistic_bn_and_is_seeded() -> None:
    a = randomize_(build_model("mbv3_05"), seed=3)
    b = randomize_(build_model("mbv3_05"), seed=3)
    c = randomize_(build_model("mbv3_05"), seed=4)
    bns = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    var = torch.cat([m.running_var for m in bns])
    mean = torch.cat([m.running_mean for m in bns])
    weight = torch.cat([m.weight.detach() for m in bns])
    assert 0.5 <= var.min() and var.max() <= 2.0 and var.std() > 0.2
    assert 0.5 <= weight.min() and weight.max() <= 1.5
    assert 0.05 < mean.std() < 0.2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.state_dict()["fc.weight"], c.state_dict()["fc.weight"])


def test_state_dict_round_trip(random_model: tuple[str, torch.nn.Module], tmp_path: Path) -> None:
    name, model = random_model
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    x = _crops(2, seed=5)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model(x))
        assert torch.equal(load_model(path, arch=name)(x), model(x))


def test_upstream_wrapping_is_undone(tmp_path: Path) -> None:
    """{'state_dict': {'module.*'}} with fc_param and an fc_lm head, as upstream saves mb1."""
    model = randomize_(build_model("mb1"), seed=1).eval()
    sd = {"module." + k.replace("fc.", "fc_param.", 1) if k.startswith("fc.") else "module." + k: v
          for k, v in model.state_dict().items()}
    sd["module.fc_lm.weight"] = torch.zeros(136, 1024)
    sd["module.fc_lm.bias"] = torch.zeros(136)
    path = tmp_path / "mb1_120x120.pth"
    torch.save({"epoch": 50, "state_dict": sd}, path)
    x = _crops(1)
    with torch.no_grad():
        assert torch.equal(load_model(path, arch="mb1")(x), model(x))


# --- errors ---------------------------------------------------------------------------------------------


def test_mb05_as_resnet22_names_key_and_shapes() -> None:
    # MobileNet x0.5 stem: 16 filters of 3x3x3; ResNet-22 stem: 32 filters of 5x5x3 (upstream sources).
    with pytest.raises(Edge3dfaError, match=r"conv1\.weight.*\(16, 3, 3, 3\).*\(32, 3, 5, 5\)") as e:
        load_model(MB05, arch="resnet22")
    assert "\n" not in str(e.value) and MB05.name in str(e.value)


def test_mb05_as_mb1_names_key_and_shapes() -> None:
    with pytest.raises(Edge3dfaError, match=r"conv1\.weight.*\(16, 3, 3, 3\).*\(32, 3, 3, 3\)"):
        load_model(MB05, arch="mb1")


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = read_state_dict(MB05)
    del sd["dw6.bn_sep.running_var"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(Edge3dfaError, match=r"missing key dw6\.bn_sep\.running_var"):
        load_model(tmp_path / "missing.pth", arch="mb05")
    sd = read_state_dict(MB05)
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(Edge3dfaError, match=r"unexpected key extra\.weight"):
        load_model(tmp_path / "extra.pth", arch="mb05")


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = MB05.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Edge3dfaError, match="truncated") as e:
        read_state_dict(path)
    assert "half.pth" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["jpeg", "text", "empty", "missing"])
def test_not_a_checkpoint(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "jpeg":
        shutil.copy(ASSETS / "upstream/3ddfa_v2/examples/inputs/JianzhuGuo.jpg", path)
    elif kind == "text":
        path.write_text("epoch: 3\nstate_dict: none\n")
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(Edge3dfaError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert path.name in msg and "\n" not in msg
    expected = {"jpeg": "not a PyTorch checkpoint", "text": "not a PyTorch checkpoint", "empty": "empty",
                "missing": "not found"}[kind]
    assert expected in msg


class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_and_not_run(writer: str, tmp_path: Path) -> None:
    target = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {"conv1.weight": torch.zeros(1), "x": _Payload(target)}}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=4)
    refusal = "refused: the file contains pickled code, only plain tensors are loaded"
    with pytest.raises(Edge3dfaError, match=refusal):
        read_state_dict(path)
    assert not target.exists()


def test_getcwd_pickle_is_refused(tmp_path: Path) -> None:
    class Cwd:
        def __reduce__(self) -> tuple:
            return os.getcwd, ()

    torch.save({"state_dict": Cwd()}, tmp_path / "cwd.pth")
    with pytest.raises(Edge3dfaError, match="refused: the file contains pickled code"):
        read_state_dict(tmp_path / "cwd.pth")


def test_no_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "state_dict": {"lr": 0.1}}, tmp_path / "empty_sd.pth")
    with pytest.raises(Edge3dfaError, match="no tensors found"):
        read_state_dict(tmp_path / "empty_sd.pth")


def test_unknown_names() -> None:
    with pytest.raises(Edge3dfaError, match="mb05"):
        get_spec("mb2")
    with pytest.raises(Edge3dfaError, match="unknown model 'mb2'.*mbv3_05"):
        load_model("mb2")
    with pytest.raises(Edge3dfaError, match="mobilenet_v1"):
        build_model("vgg16")


# --- counts ---------------------------------------------------------------------------------------------


def _mbv1_conv_macs(w: float, size: int = 120) -> int:
    """MobileNet-V1 MACs derived by hand from the layer table: stem, 13 dw+pw blocks, fc."""
    s = (size + 1) // 2
    macs = s * s * int(32 * w) * 3 * 9
    c = int(32 * w)
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
                         (1024, 2), (1024, 1)]:
        s = (s + 1) // 2 if stride == 2 else s
        cout = int(cout * w)
        macs += s * s * c * 9 + s * s * c * cout
        c = cout
    return macs + c * 62


@pytest.mark.parametrize("name,width", [("mb1", 1.0), ("mb05", 0.5)])
def test_mobilenet_v1_counts_against_readme(name: str, width: float) -> None:
    model, spec = build_model(name), get_spec(name)
    # The README rounds to 0.01M (0.6% of 0.85M): 1% leaves room for that rounding and nothing else.
    assert count_params(model) == pytest.approx(spec.paper_params_m * 1e6, rel=0.01)
    macs = count_macs(model, 120)
    assert macs == _mbv1_conv_macs(width)
    # The README counts BN/ReLU work too (~4 ops per activation, 3-7% here); conv/linear MACs sit below it.
    assert 0.92 * spec.paper_macs_m * 1e6 < macs < spec.paper_macs_m * 1e6


def test_mb05_param_count_matches_fixture_readme() -> None:
    # fixtures/README.md: "teacher mb05: 850,398 without its unused fc_lm head".
    assert count_params(build_model("mb05")) == 850_398


# Upstream 3DDFA_V2 models/mobilenet_v3.py (the MobileNet-V3 paper's Tables 1 and 2), transcribed here:
# kernel, expansion, out, SE, stride per block (activations carry no weights); then the 1x1 "last conv".
_UPSTREAM_MBV3 = {
    "large": [(3, 16, 16, 0, 1), (3, 64, 24, 0, 2), (3, 72, 24, 0, 1), (5, 72, 40, 1, 2), (5, 120, 40, 1, 1),
              (5, 120, 40, 1, 1), (3, 240, 80, 0, 2), (3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1),
              (3, 480, 112, 1, 1), (3, 672, 112, 1, 1), (5, 672, 160, 1, 2), (5, 960, 160, 1, 1),
              (5, 960, 160, 1, 1)],
    "small": [(3, 16, 16, 1, 2), (3, 72, 24, 0, 2), (3, 88, 24, 0, 1), (5, 96, 40, 1, 2), (5, 240, 40, 1, 1),
              (5, 240, 40, 1, 1), (5, 120, 48, 1, 1), (5, 144, 48, 1, 1), (5, 288, 96, 1, 2), (5, 576, 96, 1, 1),
              (5, 576, 96, 1, 1)],
}
_UPSTREAM_LAST_CONV = {"large": 960, "small": 576}


def _upstream_mbv3(mode: str, w: float, size: int = 120) -> tuple[dict[str, tuple[int, ...]], int]:
    """Key -> shape of upstream's ``MobileNetV3(widen_factor=w, num_classes=62, mode=mode)`` state dict, in
    registration order, and its conv + linear MACs at ``size``, by upstream's rules: a 16-channel stem,
    ``make_divisible(c * w)`` (ceil to 8) everywhere else, and a 1280-wide head widened only for w > 1."""

    def div(x: float) -> int:
        return int(np.ceil(x * 1.0 / 8) * 8)

    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    s = (size - 1) // 2 + 1  # every stride-2 conv here pads (k-1)/2: ceil(s / 2)
    shapes["features.0.0.weight"] = (16, 3, 3, 3)
    bn("features.0.1", 16)
    macs, inp = s * s * 16 * 27, 16
    for i, (k, exp, c, se, stride) in enumerate(_UPSTREAM_MBV3[mode], 1):
        e, o, p = div(exp * w), div(c * w), f"features.{i}.conv"
        shapes[f"{p}.0.weight"] = (e, inp, 1, 1)
        bn(f"{p}.1", e)
        macs += s * s * inp * e
        s = (s - 1) // 2 + 1 if stride == 2 else s
        shapes[f"{p}.3.weight"] = (e, 1, k, k)
        bn(f"{p}.4", e)
        macs += s * s * e * k * k
        if se:
            shapes[f"{p}.5.fc.0.weight"], shapes[f"{p}.5.fc.2.weight"] = (e // 4, e), (e, e // 4)
            macs += 2 * e * (e // 4)
        shapes[f"{p}.7.weight"] = (o, e, 1, 1)
        bn(f"{p}.8", o)
        macs += s * s * e * o
        inp = o
    n, last = len(_UPSTREAM_MBV3[mode]), div(_UPSTREAM_LAST_CONV[mode] * w)
    head = div(1280 * w) if w > 1.0 else 1280
    shapes[f"features.{n + 1}.0.weight"] = (last, inp, 1, 1)
    bn(f"features.{n + 1}.1", last)
    shapes[f"features.{n + 3}.weight"], shapes[f"features.{n + 3}.bias"] = (head, last, 1, 1), (head,)
    shapes["fc.weight"], shapes["fc.bias"] = (62, head), (62,)
    return shapes, macs + s * s * inp * last + last * head + head * 62


def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(v)) for k, v in shapes.items() if not k.endswith(("running_mean", "running_var",
                                                                             "num_batches_tracked")))


@pytest.mark.parametrize("mode", ["small", "large"])
@pytest.mark.parametrize("width", [0.35, 0.5, 1.25])  # below 1, the fixtures' width, a widened head
def test_mbv3_layout_and_counts_match_upstream_formula(mode: str, width: float) -> None:
    model = build_model(f"mobilenet_v3_{mode}", width)
    shapes, macs = _upstream_mbv3(mode, width)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(shapes.items())
    assert count_params(model) == _params(shapes)
    assert count_macs(model, 120) == macs
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 120, 120)).shape == (1, 62)


def test_mbv3_fixture_counts_match_their_readme() -> None:
    # fixtures/README.md: small x0.5 701,094 parameters; large x0.5 1,470,870 and "22.0 M MACs at 120 px".
    assert _params(_upstream_mbv3("small", 0.5)[0]) == 701_094
    shapes, macs = _upstream_mbv3("large", 0.5)
    assert _params(shapes) == 1_470_870 and round(macs / 1e6, 1) == 22.0
    assert count_macs(load_model(MBV3_LARGE_FIXTURE), 120) == macs


@pytest.mark.parametrize("mode", ["small", "large"])
@pytest.mark.parametrize("width", [0.25, 0.35, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0])
def test_infer_mbv3_mode_and_width_from_upstream_shapes(mode: str, width: float) -> None:
    sd = {k: torch.empty(v) for k, v in _upstream_mbv3(mode, width)[0].items()}
    assert infer_arch(sd) == (f"mobilenet_v3_{mode}", width)


@pytest.mark.parametrize("mode,width", [("small", 0.33), ("large", 0.33), ("large", 0.77), ("large", 1.7)])
def test_infer_mbv3_width_that_gives_the_same_network(mode: str, width: float) -> None:
    """Widths are ceiled to multiples of 8, so several multipliers make one network: any of them will do."""
    shapes = _upstream_mbv3(mode, width)[0]
    arch, got = infer_arch({k: torch.empty(v) for k, v in shapes.items()})
    assert arch == f"mobilenet_v3_{mode}" and _upstream_mbv3(mode, got)[0] == shapes


def test_mbv3_of_no_width_or_mode_is_one_line_error() -> None:
    shapes = _upstream_mbv3("large", 0.5)[0]
    odd = {**shapes, "features.15.conv.7.weight": (88, 480, 1, 1)}  # 160 x w = 88 but 960 x w = 480: no w
    with pytest.raises(Edge3dfaError, match=r"MobileNet-V3-large of unknown width"):
        infer_arch({k: torch.empty(v) for k, v in odd.items()})
    with pytest.raises(Edge3dfaError, match=r"scalar where a weight should be"):
        infer_arch({k: torch.empty(() if k == "features.3.conv.0.weight" else v) for k, v in shapes.items()})
    fewer = {k: v for k, v in shapes.items() if not k.startswith("features.15.")}
    with pytest.raises(Edge3dfaError, match=r"MobileNet-V3 with 14 bottleneck blocks"):
        infer_arch({k: torch.empty(v) for k, v in fewer.items()})


def test_count_macs_scales_with_input_and_leaves_training_mode() -> None:
    model = build_model("resnet22").train()
    small, large = count_macs(model, 64), count_macs(model, 128)
    assert model.training
    assert 3.5 < large / small < 4.5


# --- export-friendly forms and torch-free import --------------------------------------------------------


def test_mbv3_graph_has_no_expand_or_fused_hard_activations() -> None:
    gm = torch.fx.symbolic_trace(build_model("mbv3_05"))
    targets = {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes}
    assert "clamp" in targets
    assert not any(t in targets for t in ("expand_as", "expand", "hardswish", "hardsigmoid", "relu6"))
    with torch.no_grad():
        assert build_model("mbv3_05").eval()(torch.zeros(1, 3, 120, 120)).shape == (1, 62)


def test_models_package_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; import edge3dfa.models as m; "
            "print(sorted(m.MODELS)); print(m.get_spec('mb05').checkpoint_asset)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.split("\n")[:2] == ["['faceboxes', 'mb05', 'mb1', 'mbv3_05', 'mbv3_large_05', 'resnet22']", "mb05"]
    assert set(MODELS) == {"mb1", "mb05", "mbv3_05", "mbv3_large_05", "resnet22", "faceboxes"}


def test_models_table_shows_computed_and_paper_counts_and_the_papers_mode(capsys: pytest.CaptureFixture) -> None:
    from edge3dfa.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {ln.split()[0]: ln.split() for ln in lines if ln and ln.split()[0] in MODELS}
    assert set(row) == set(MODELS)
    # computed here (upstream formula above; fixtures/README.md) next to the 3DDFA_V2 paper's Table 1 row
    large = _upstream_mbv3("large", 0.5)
    assert row["mbv3_large_05"][1:10] == ["regressor", "mobilenet_v3_large", "0.5", "120",
                                          f"{_params(large[0]) / 1e6:.2f}", "1.65", f"{large[1] / 1e6:.1f}", "27.4",
                                          "none"]
    assert row["mbv3_05"][2] == "mobilenet_v3_small" and row["mbv3_05"][6] == row["mbv3_05"][8] == "-"
    assert row["faceboxes"][1:5] == ["detector", "faceboxes", "1", "any"]
    source = next(ln for ln in lines if ln.strip().startswith("mbv3_large_05:"))
    assert "Table 1" in source and "large mode" in source


@pytest.mark.parametrize("arch, error", [(None, None), ("mobilenet_v1", None), ("mb05", None),
                                         ("nonsense", "unknown model 'nonsense'"), ("resnet22", "not resnet22"),
                                         ("mb1", "not mb1")])
def test_an_arch_beside_a_zoo_name_must_agree_with_it(arch, error):
    """`run --model mb05 --arch nonsense` ran mb05 and exited 0: --arch was silently ignored for zoo names."""
    from edge3dfa.models.checkpoint import Checkpoint

    if error is None:
        assert Checkpoint.open("mb05", arch=arch).arch == "mobilenet_v1"
    else:
        with pytest.raises(Edge3dfaError, match=error):
            Checkpoint.open("mb05", arch=arch)
