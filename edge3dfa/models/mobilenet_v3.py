"""MobileNet-V3 regressors (small and large mode) in the layout of 3DDFA_V2's ``models/mobilenet_v3.py``.

Same module tree (so upstream-format checkpoints load strictly) with two deliberate changes: any input size
is accepted (upstream asserted ``input_size % 32 == 0``, which rejects the 120x120 crops it is run on), and
the activations / SE scaling are written as ``clamp`` and a plain broadcast multiply, the forms the
litert-torch and coremltools exporters lower cleanly.

Upstream builds both modes of the MobileNet-V3 paper (Howard et al. 2019, Tables 1 and 2) from one class; its
default is ``mode='small'``, while the 3DDFA_V2 paper's "MobileNet-V3 x0.5" is the large mode (its Fig. 3
caption). A checkpoint does not record its mode or width, so :func:`mode_and_width` reads both back from the
tensor shapes: the mode from the number of bottleneck blocks, the width as the simplest multiplier whose
``make_divisible`` channel counts reproduce every layer (many multipliers give the same network; any of
them builds identical shapes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from edge3dfa.errors import Edge3dfaError

STEM = 16  # upstream's first conv has 16 channels at every width
LAST_CHANNEL = 1280  # the head conv; widened only for multipliers above 1

# Upstream's layer tables (MobileNet-V3 paper Tables 1 and 2): kernel, expansion, out, SE, activation, stride.
SETTINGS: dict[str, tuple[tuple[int, int, int, bool, str, int], ...]] = {
    "large": (
        (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
    ),
    "small": (
        (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
    ),
}
LAST_CONV = {"large": 960, "small": 576}  # the 1x1 conv before pooling, scaled by the width


def make_divisible(x: float, divisible_by: int = 8) -> int:
    """Round a channel count up to a multiple of 8, as upstream does."""
    return int(math.ceil(x / divisible_by) * divisible_by)


def channel_plan(mode: str, widen_factor: float) -> tuple[int, ...]:
    """Every width upstream derives from the multiplier: (expand, out) per block, last conv, head."""
    if mode not in SETTINGS:
        raise Edge3dfaError(f"unknown MobileNet-V3 mode {mode!r}; known: {', '.join(SETTINGS)}")
    if not widen_factor > 0:
        raise Edge3dfaError(f"MobileNet-V3 width multiplier must be > 0 (got {widen_factor})")
    plan: list[int] = []
    for _k, exp, c, _se, _nl, _s in SETTINGS[mode]:
        plan += [make_divisible(exp * widen_factor), make_divisible(c * widen_factor)]
    head = make_divisible(LAST_CHANNEL * widen_factor) if widen_factor > 1.0 else LAST_CHANNEL
    return (*plan, make_divisible(LAST_CONV[mode] * widen_factor), head)


def _observed_plan(shapes: Mapping[str, Sequence[int]], blocks: int) -> tuple[int, ...]:
    """The same widths read from a state dict's shapes (upstream keys, ``module.`` already stripped)."""
    try:
        plan: list[int] = []
        for i in range(1, blocks + 1):
            plan += [shapes[f"features.{i}.conv.0.weight"][0], shapes[f"features.{i}.conv.7.weight"][0]]
        plan += [shapes[f"features.{blocks + 1}.0.weight"][0], shapes[f"features.{blocks + 3}.weight"][0]]
    except KeyError as e:
        raise Edge3dfaError(f"MobileNet-V3 with {blocks} blocks but no key {e.args[0]}") from None
    except IndexError:
        raise Edge3dfaError(f"MobileNet-V3 with {blocks} blocks but a scalar where a weight should be") from None
    return tuple(int(n) for n in plan)


def _width_bounds(mode: str, plan: tuple[int, ...]) -> tuple[float, float]:
    """(lo, hi]: the multipliers for which every ``make_divisible(c * w)`` can equal the observed width."""
    bases = [b for _k, exp, c, _se, _nl, _s in SETTINGS[mode] for b in (exp, c)] + [LAST_CONV[mode]]
    lo, hi = 0.0, math.inf
    for base, n in zip(bases, plan):
        lo, hi = max(lo, (n - 8) / base), min(hi, n / base)
    if plan[-1] == LAST_CHANNEL:
        hi = min(hi, 1.0)
    else:
        lo, hi = max(lo, (plan[-1] - 8) / LAST_CHANNEL, 1.0), min(hi, plan[-1] / LAST_CHANNEL)
    return lo, hi


def mode_and_width(shapes: Mapping[str, Sequence[int]]) -> tuple[str, float]:
    """(mode, widen_factor) of a MobileNet-V3 state dict, from its block count and channel counts."""
    blocks = sum(1 for k in shapes if k.startswith("features.") and k.endswith(".conv.0.weight"))
    modes = {len(rows): mode for mode, rows in SETTINGS.items()}
    if blocks not in modes:
        known = ", ".join(f"{m} {n}" for n, m in modes.items())
        raise Edge3dfaError(f"MobileNet-V3 with {blocks} bottleneck blocks; upstream's modes have {known}")
    mode = modes[blocks]
    plan = _observed_plan(shapes, blocks)
    lo, hi = _width_bounds(mode, plan)
    for step in (0.25, 0.05, 0.01, 0.001, 0.0001):  # the simplest multiplier first
        for k in range(max(1, math.floor(lo / step)), math.ceil(hi / step) + 1):
            w = round(k * step, 4)
            if channel_plan(mode, w) == plan:
                return mode, w
    raise Edge3dfaError(f"MobileNet-V3-{mode} of unknown width: no multiplier gives its channel counts "
                        f"(block 1 expand/out {plan[0]}/{plan[1]}, last conv {plan[-2]}, head {plan[-1]})")


class Hswish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class Hsigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class SEModule(nn.Module):
    """Squeeze-and-excitation; the scale is broadcast (``x * s``), not ``expand_as``."""

    def __init__(self, channel: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channel // reduction, channel, bias=False),
            Hsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc(self.avg_pool(x).flatten(1))
        return x * s[:, :, None, None]


def _conv_bn(inp: int, oup: int, kernel: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    conv = nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(oup), act())


class MobileBottleneck(nn.Module):
    """1x1 expand, kxk depthwise (+SE), 1x1 project; residual when shapes allow."""

    def __init__(
        self, inp: int, oup: int, kernel: int, stride: int, exp: int, se: bool, act: type[nn.Module]
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, 1, 0, bias=False),
            nn.BatchNorm2d(exp),
            act(),
            nn.Conv2d(exp, exp, kernel, stride, (kernel - 1) // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            SEModule(exp) if se else nn.Identity(),
            act(),
            nn.Conv2d(exp, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV3(nn.Module):
    """[N,3,H,W] -> [N,num_classes]; ends in global pooling, so 120x120 (or any size) works."""

    def __init__(self, widen_factor: float = 1.0, num_classes: int = 62, mode: str = "small") -> None:
        super().__init__()
        self.widen_factor, self.mode = widen_factor, mode
        plan = channel_plan(mode, widen_factor)
        layers: list[nn.Module] = [_conv_bn(3, STEM, 3, 2, Hswish)]
        inp = STEM
        for i, (k, _exp, _c, se, nl, s) in enumerate(SETTINGS[mode]):
            exp, out = plan[2 * i], plan[2 * i + 1]
            layers.append(MobileBottleneck(inp, out, k, s, exp, se, nn.ReLU if nl == "RE" else Hswish))
            inp = out
        last_conv, last_channel = plan[-2], plan[-1]
        layers += [
            _conv_bn(inp, last_conv, 1, 1, Hswish),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(last_conv, last_channel, 1, 1, 0),
            Hswish(),
        ]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last_channel, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))
