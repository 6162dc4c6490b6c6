"""MobileNet-V1 regressor of 3DDFA_V2 (mb1, mb05), keyed exactly like upstream's ``models/mobilenet_v1.py``.

Attribute names mirror upstream so that released checkpoints load strictly once ``module.`` is stripped and
``fc_param`` is renamed ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthWiseBlock(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, inplanes: float, planes: float, stride: int = 1) -> None:
        super().__init__()
        inplanes, planes = int(inplanes), int(planes)
        self.conv_dw = nn.Conv2d(inplanes, inplanes, 3, stride=stride, padding=1, groups=inplanes, bias=False)
        self.bn_dw = nn.BatchNorm2d(inplanes)
        self.conv_sep = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))
        return self.relu(self.bn_sep(self.conv_sep(x)))


# (name, in, out, stride) in units of the widen factor, as in upstream.
_BLOCKS = (
    ("dw2_1", 32, 64, 1), ("dw2_2", 64, 128, 2),
    ("dw3_1", 128, 128, 1), ("dw3_2", 128, 256, 2),
    ("dw4_1", 256, 256, 1), ("dw4_2", 256, 512, 2),
    ("dw5_1", 512, 512, 1), ("dw5_2", 512, 512, 1), ("dw5_3", 512, 512, 1),
    ("dw5_4", 512, 512, 1), ("dw5_5", 512, 512, 1), ("dw5_6", 512, 1024, 2),
    ("dw6", 1024, 1024, 1),
)


class MobileNetV1(nn.Module):
    """[N,3,H,W] BGR crop (normalised) -> [N,num_classes] normalised 3DMM params."""

    def __init__(self, widen_factor: float = 1.0, num_classes: int = 62) -> None:
        super().__init__()
        w = widen_factor
        self.widen_factor = w
        self.conv1 = nn.Conv2d(3, int(32 * w), 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(int(32 * w))
        self.relu = nn.ReLU()
        for name, cin, cout, stride in _BLOCKS:
            setattr(self, name, DepthWiseBlock(cin * w, cout * w, stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(int(1024 * w), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name, *_ in _BLOCKS:
            x = getattr(self, name)(x)
        return self.fc(self.avgpool(x).flatten(1))
