"""ExecuTorch converter and target, against PyTorch on AFLW2000-3D crops and on a small hand-built network.

mb05 is converted once per module (fp32 and int8 on 32 calibration crops); everything that does not need the
real model (layer naming, calibration reuse, static batch, wrong programs) uses a four-layer network that lowers
in seconds. Expected values come from PyTorch, the model's own module tree, or an independent calibration.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch")

import torch  # noqa: E402
from conftest import eval_crops, landmark_error  # noqa: E402
from torch import nn  # noqa: E402

from edge3dfa import assets  # noqa: E402
from edge3dfa.converters import convert, get_format  # noqa: E402
from edge3dfa.converters.executorch import Int8Builder, exported, lower  # noqa: E402
from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.manifest import Manifest, manifest_path  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402
from edge3dfa.target import open_target  # noqa: E402
from edge3dfa.targets.executorch import ExecuTorchTarget  # noqa: E402
from edge3dfa.targets.torch import TorchTarget  # noqa: E402

CALIB = 32
THREADS = 2
FORMAT = get_format("executorch")


def options(**values):  # noqa: ANN003, ANN201
    return FORMAT.Options.parse(values)


class Tiny(nn.Module):
    """Five weighted layers with the op kinds of the zoo: strided conv + BN + ReLU, depthwise, hard-swish,
    MobileNet-V3's squeeze-excite (mean, linear, ReLU, linear, hard-sigmoid, multiply) and the params linear."""

    def __init__(self, outputs: int = 62) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8), nn.Hardsigmoid())
        self.pw = nn.Conv2d(8, 16, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(self.stem(x)))
        x = x * self.se(x.mean((2, 3)))[:, :, None, None]
        return self.fc(self.act(self.pw(x)).mean((2, 3)))


def tiny(outputs: int = 62) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny(outputs).eval()
    with torch.no_grad():  # BN statistics that are not the identity
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model


def tiny_source(outputs: int = 62) -> Checkpoint:
    """The tiny network as an in-memory checkpoint (a regressor, as the format converts)."""
    return Checkpoint.from_module(tiny(outputs), "tiny", "mobilenet")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return eval_crops(0, 64)


@pytest.fixture(scope="module")
def mb05(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("executorch_out")
    arts = convert("mb05", to="executorch", precision=["fp32", "int8"], out_dir=out, calibration={"count": CALIB},
                   threads=THREADS, verbose=False)
    return {a.manifest.precision: a for a in arts}


@pytest.fixture(scope="module")
def mb05_ref(crops) -> np.ndarray:
    return TorchTarget("mb05", threads=THREADS).predict(crops)


@pytest.fixture(scope="module")
def tiny_builder(crops) -> Int8Builder:
    return FORMAT.int8_builder(tiny_source(), options(float_input=False, float_output=False), crops[:16], None)


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.slow
def test_fp32_params_match_pytorch(mb05, mb05_ref, crops):
    cand = ExecuTorchTarget(mb05["fp32"].path, threads=THREADS).predict(crops)
    assert np.abs(cand - mb05_ref).max() <= 1e-4


@pytest.mark.slow
def test_int8_mean_landmark_error(mb05, mb05_ref, crops):
    px = landmark_error(mb05_ref, ExecuTorchTarget(mb05["int8"].path, threads=THREADS).predict(crops))
    assert px.mean() <= 0.5  # the bounds the TFLite int8 test holds too
    assert px.max() <= 5.0


# ---------------------------------------------------------------------------------------------- manifest
@pytest.mark.slow
def test_manifests_describe_delegate_runtime_and_quantization(mb05):
    for prec, art in mb05.items():
        m = Manifest.read(manifest_path(art.path))
        assert m.check_artifact(manifest_path(art.path)) == art.path
        assert m.format == "executorch" and m.min_runtime == {"executorch": version("executorch")}
        assert {"torch", "executorch", "torchao"} <= set(m.tools)
        delegation = m.options["delegation"]
        assert delegation["delegated"]["aten_convolution_default"] == 27  # every conv of MobileNet-V1 (27)
        assert "aten_convolution_default" not in delegation["cpu_fallback"], prec
    int8 = mb05["int8"].manifest
    assert int8.calibration and int8.calibration["count"] == CALIB
    assert int8.options["always_float"] == ["conv1", "fc"]  # the first conv and the params layer, by default
    assert int8.size_bytes < mb05["fp32"].manifest.size_bytes / 2.5  # int8 weights, not fp32 ones


# ---------------------------------------------------------------------------------------------- target
@pytest.mark.slow
def test_any_batch_and_thread_count_give_the_same_params(mb05, crops):
    """Batches below, at and above the program's capacity, on 1 and 2 threads, alternating between targets (each
    switch replaces ExecuTorch's one thread pool, so a target must reload its method before running)."""
    one = ExecuTorchTarget(mb05["fp32"].path, threads=1)
    two = ExecuTorchTarget(mb05["fp32"].path, threads=2)
    assert one.capacity == FORMAT.Options().max_batch < 40
    single = np.concatenate([one.predict(crops[i:i + 1]) for i in range(40)])
    for target in (two, one, two):
        for n in (1, 5, 40):
            np.testing.assert_allclose(target.predict(crops[:n]), single[:n], atol=1e-5)


@pytest.mark.slow
def test_static_batch_program_runs_any_batch(tmp_path, crops):
    """Also: hard-swish and squeeze-excite (MobileNet-V3's ops) lower into the delegate and keep PyTorch's params
    (the MobileNet-V3 fixture itself: benchmarks/int8_choices.py, README)."""
    source = tiny_source()
    model = source.load()
    fields = FORMAT.write(source, tmp_path / "b1.pte", "fp32", options(max_batch=1), None)
    t = ExecuTorchTarget(tmp_path / "b1.pte", threads=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(crops[:3])).numpy()
    assert t.capacity == 1 and fields["options"]["max_batch"] == 1
    np.testing.assert_allclose(t.predict(crops[:3]), ref, atol=1e-4)
    delegated = fields["options"]["delegation"]["delegated"]
    assert delegated["aten_hardswish_default"] == 1 and delegated["aten_convolution_default"] == 3


@pytest.mark.slow
def test_truncated_or_corrupt_file_is_one_line_error(mb05, tmp_path):
    data = mb05["fp32"].path.read_bytes()
    garbled = data[:64] + b"\xff" * 32 + data[96:]  # the program's flatbuffer tables, right after the header
    cases = {"half": data[: len(data) // 2], "header": data[:40], "empty": b"", "text": b"not a program\n" * 9,
             "garbled": garbled}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.pte"
        path.write_bytes(blob)
        with pytest.raises(Edge3dfaError) as e:
            open_target(path).predict(np.zeros((1, 3, 120, 120), np.float32))
        assert path.name in str(e.value) and "\n" not in str(e.value), name


@pytest.mark.slow
def test_program_of_another_model_is_one_line_error(tmp_path):
    content, _ = lower(exported(tiny(outputs=10), 2))  # FORMAT.write itself refuses it (its self-check)
    (tmp_path / "ten.pte").write_bytes(content)
    with pytest.raises(Edge3dfaError, match=r"outputs \[2, 10\].*not a 3DDFA regressor"):
        ExecuTorchTarget(tmp_path / "ten.pte")


@pytest.mark.slow
def test_corrupt_file_in_a_fresh_process_exits_2(mb05, tmp_path):
    """The CLI path: a broken .pte is exit code 2 and one line, without the runtime's C++ log on the terminal."""
    bad = tmp_path / "bad.pte"
    bad.write_bytes(mb05["fp32"].path.read_bytes()[:100_000])
    img = assets.fetch("emma")
    res = subprocess.run([sys.executable, "-m", "edge3dfa.cli", "run", str(img), "--artifact", str(bad),
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.pte" in lines[0] and "truncated or corrupt" in lines[0], res.stderr


# ---------------------------------------------------------------------------------------------- int8 builder
@pytest.mark.slow
def test_layers_are_the_weighted_modules_in_order(tiny_builder):
    expected = [n for n, m in tiny().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(tiny_builder.layers) == expected == ["stem.0", "dw", "se.0", "se.2", "pw", "fc"]
    assert tiny_builder.always_float == []  # float_input / float_output off; mb05's defaults: see the manifest test


@pytest.mark.slow
def test_keep_float_reuses_the_calibration_exactly(tiny_builder, crops):
    """A variant given the shared calibration computes exactly what one calibrated on its own computes."""
    x = torch.from_numpy(crops[16:32])
    own = FORMAT.int8_builder(tiny_source(), options(float_input=False, float_output=False, exclude="pw"),
                              crops[:16], None)
    graphs = {"kept": tiny_builder.quantized(["pw"]), "alone": own.quantized(), "every": tiny_builder.quantized()}
    with torch.no_grad():
        out = {k: g(x) for k, g in graphs.items()}
    assert own.always_float == ["pw"]
    assert torch.equal(out["kept"], out["alone"])
    assert not torch.equal(out["kept"], out["every"])
    assert quantize_ops(graphs["kept"]) < quantize_ops(graphs["every"])  # pw's input, output and weight left int8


def quantize_ops(graph) -> int:  # noqa: ANN001
    return sum(1 for n in graph.graph.nodes if n.op == "call_function" and "quantize_per" in str(n.target)
               and "dequantize" not in str(n.target))


def test_bad_options_are_user_errors():
    with pytest.raises(Edge3dfaError, match="unknown executorch option"):
        options(head="int8")
    with pytest.raises(Edge3dfaError, match="apply to int8 only"):
        FORMAT.check("fp32", False, options(float_input=False))
    FORMAT.check("fp32", False, options(max_batch=4))  # max_batch is every precision's
    with pytest.raises(Edge3dfaError, match="max_batch must be 1..1024"):
        options(max_batch=0)
    with pytest.raises(Edge3dfaError, match="max_batch must be a whole number"):
        options(max_batch="32.5")
    with pytest.raises(Edge3dfaError, match="observer"):
        options(observer="entropy")
    with pytest.raises(Edge3dfaError, match="FaceBoxes"):
        FORMAT.check("fp32", True, options())
    with pytest.raises(Edge3dfaError, match="calibration"):
        FORMAT.write(tiny_source(), Path("unused.pte"), "int8", options(), None)


@pytest.mark.slow
def test_bad_layers_are_user_errors(tiny_builder, crops):
    with pytest.raises(Edge3dfaError, match="no layer 'nope'"):
        tiny_builder.export(Path("unused.pte"), ["nope"])
    with pytest.raises(Edge3dfaError, match="exclude: no layer"):
        FORMAT.int8_builder(tiny_source(), options(exclude="stem.9"), crops[:4], None)


def test_a_missing_runtime_names_its_extra_from_the_package_metadata(tmp_path, monkeypatch):
    """The core knows no format by name: the pip extra in the message is the one pyproject.toml declares for the
    missing distribution (executorch -> edge3dfa[executorch])."""
    import edge3dfa.target as target_module

    class Missing:
        def load(self):  # noqa: ANN202
            raise ImportError("No module named 'executorch'", name="executorch")

    monkeypatch.setattr(target_module, "target_suffixes", lambda: {".pte": Missing()})
    path = tmp_path / "x.pte"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(Edge3dfaError, match=r"pip install 'edge3dfa\[executorch\]'"):
        open_target(path, verify=False)
