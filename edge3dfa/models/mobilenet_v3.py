"""MobileNet-V3-small regressor in the layout of 3DDFA_V2's ``models/mobilenet_v3.py``.

Same module tree (so upstream-format checkpoints load strictly) with two deliberate changes: any input size
is accepted (upstream asserted ``input_size % 32 == 0``, which rejects the 120x120 crops it is run on), and
the activations / SE scaling are written as ``clamp`` and a plain broadcast multiply, the forms the
litert-torch and coremltools exporters lower cleanly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_divisible(x: float, divisible_by: int = 8) -> int:
    """Round a channel count up to a multiple of 8, as upstream does."""
    return int(math.ceil(x / divisible_by) * divisible_by)


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


# MobileNet-V3 paper Table 2 (small): kernel, expansion, out, SE, activation, stride.
_SMALL = (
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
)


class MobileNetV3Small(nn.Module):
    """[N,3,H,W] -> [N,num_classes]; ends in global pooling, so 120x120 (or any size) works."""

    def __init__(self, widen_factor: float = 1.0, num_classes: int = 62, last_channel: int = 1280) -> None:
        super().__init__()
        self.widen_factor = widen_factor
        if widen_factor > 1.0:
            last_channel = make_divisible(last_channel * widen_factor)
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, Hswish)]
        inp = 16
        for k, exp, c, se, nl, s in _SMALL:
            out = make_divisible(c * widen_factor)
            act = nn.ReLU if nl == "RE" else Hswish
            layers.append(MobileBottleneck(inp, out, k, s, make_divisible(exp * widen_factor), se, act))
            inp = out
        last_conv = make_divisible(576 * widen_factor)
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
