"""ExecuTorch int8 choices of issue 18: the params layer's bias correction (default) and ``hard_swish``.

Bias correction is checked against the float model's own params (PyTorch, not the converter): on the
calibration crops the int8 graph's mean params error is gone, on other crops it shrinks. Upstream 3DDFA_V2's
MobileNet-V3 writes hard-swish out as ``x * relu6(x + 3) / 6``; the XNNPACK quantizer annotates its add, clamp
and mul, so every hard-swish re-quantizes three more times unless ``hard_swish=float``. The pattern finder is
checked against networks whose hard-swish count is known by construction, and the float hard-swish against
the int8 one on a hand-built network with PyTorch's fp32 output as the reference (README "ExecuTorch";
``benchmarks/executorch_int8.py`` measures the fixtures).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from conftest import eval_crops  # noqa: E402
from torch import nn  # noqa: E402

from edge3dfa.converters import get_format  # noqa: E402
from edge3dfa.converters.executorch import exported, hard_swish_nodes  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402

FORMAT = get_format("executorch")


def swish_a(x: torch.Tensor) -> torch.Tensor:  # upstream's h_swish: x * relu6(x + 3) / 6
    return x * F.relu6(x + 3.0) / 6.0


def swish_b(x: torch.Tensor) -> torch.Tensor:  # the same, parenthesised as x * hard_sigmoid(x)
    return x * (F.relu6(x + 3.0) / 6.0)


def gate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # hard-sigmoid of y scaling x: not a hard-swish
    return x * (F.relu6(y + 3.0) / 6.0)


class Swishes(nn.Module):
    """Two hand-written hard-swishes of each spelling, one hard-sigmoid gate and one ``nn.Hardswish``."""

    def __init__(self, outputs: int = 62) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)
        self.gate = nn.Conv2d(32, 32, 1)
        self.pw2 = nn.Conv2d(32, 32, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(32, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = swish_a(self.dw(swish_a(self.stem(x))))
        x = swish_b(self.dw2(swish_b(self.pw(x))))
        x = self.act(self.pw2(gate(x, self.gate(x))))
        return self.fc(x.mean((2, 3)))


def swishes() -> nn.Module:
    """Seeded; the convs' weights scaled up so that the hard-swish inputs span several units, as a trained
    network's do (default initialisation keeps them within about +-1, where hard-swish is almost linear)."""
    torch.manual_seed(0)
    model = Swishes().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
        model.stem[0].weight.mul_(4)
        for conv in (model.dw, model.pw, model.dw2, model.pw2):
            conv.weight.mul_(2)
    return model


def test_hard_swish_nodes_are_the_hand_written_hard_swishes():
    graph = exported(swishes(), 1).module()
    names = hard_swish_nodes(graph)
    ops = sorted(n.target.__name__.split(".")[0] for n in graph.graph.nodes if n.name in names)
    # four hand-written hard-swishes of four ops each; the gate and nn.Hardswish are not among them
    assert len(names) == 16
    assert set(ops) <= {"add", "clamp", "hardtanh", "relu6", "mul", "div"}
    assert ops.count("mul") == 4 and ops.count("add") == 4 and ops.count("div") == 4
    every_mul = sum(1 for n in graph.graph.nodes if n.op == "call_function" and n.target.__name__.startswith("mul"))
    assert every_mul == 5  # the gate's mul exists and was left out


def test_mb05_has_no_hard_swish():
    """MobileNet-V1 (ReLU only): the option changes nothing there."""
    assert hard_swish_nodes(exported(Checkpoint.open("mb05").load(), 1).module()) == frozenset()


@pytest.mark.slow
def test_float_hard_swish_departs_less_from_fp32():
    crops = eval_crops(0, 96)
    source = Checkpoint.from_module(swishes(), "swishes", "mobilenet")
    x = torch.from_numpy(crops[48:])
    with torch.no_grad():
        ref = source.load()(x).numpy()
    err, quantizers = {}, {}
    for precision in ("float", "int8"):
        b = FORMAT.int8_builder(source, FORMAT.Options.parse({"hard_swish": precision}), crops[:48], None)
        graph = b.quantized()
        with torch.no_grad():
            err[precision] = float(np.sqrt(((graph(x).numpy() - ref) ** 2).mean()))
        quantizers[precision] = sum(1 for n in graph.graph.nodes if n.op == "call_function"
                                    and str(n.target).endswith("quantize_per_tensor.default")
                                    and "dequantize" not in str(n.target))
    assert quantizers["float"] < quantizers["int8"]  # the add, clamp and mul outputs are not re-quantized
    assert err["float"] < err["int8"], err


@pytest.mark.slow
def test_bias_correction_removes_the_mean_params_error():
    crops = eval_crops(0, 96)
    source = Checkpoint.from_module(swishes(), "swishes", "mobilenet")
    calib, other = crops[:48], crops[48:]
    with torch.no_grad():
        ref = {k: source.load()(torch.from_numpy(x)).numpy() for k, x in (("calib", calib), ("other", other))}
    mean_error = {}
    for corrected in ("off", "on"):
        b = FORMAT.int8_builder(source, FORMAT.Options.parse({"bias_correction": corrected}), calib, None)
        graph = b.quantized()
        assert (b.output_shift is not None) == (corrected == "on")
        with torch.no_grad():
            for k, x in (("calib", calib), ("other", other)):
                mean_error[corrected, k] = float(np.linalg.norm((graph(torch.from_numpy(x)).numpy() - ref[k]).mean(0)))
    assert mean_error["on", "calib"] < 0.01 * mean_error["off", "calib"], mean_error
    assert mean_error["on", "other"] < mean_error["off", "other"], mean_error


@pytest.mark.slow
def test_auto_bias_correction_gives_the_on_or_the_off_graph_as_judged():
    """``auto`` keeps the correction only where the held-out NME says so, and taking it back restores exactly
    the uncorrected graph."""
    crops = eval_crops(0, 64)
    source = Checkpoint.from_module(swishes(), "swishes", "mobilenet")
    x = torch.from_numpy(crops[48:])
    out, judge = {}, None
    for mode in ("off", "on", "auto"):
        b = FORMAT.int8_builder(source, FORMAT.Options.parse({"bias_correction": mode}), crops[:48], None)
        graph = b.quantized()
        with torch.no_grad():
            out[mode] = graph(x).numpy()
        judge = b.bias_judge if mode == "auto" else judge
    nme = judge["heldout_balanced_nme"]
    assert judge["kept"] == (nme["corrected"] < nme["uncorrected"])
    assert np.array_equal(out["auto"], out["on" if judge["kept"] else "off"])
    assert not np.array_equal(out["on"], out["off"])
