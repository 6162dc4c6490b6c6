"""ResNet-22 regressor of 3DDFA_V2 (upstream ``models/resnet.py`` ``resnet22``), same keys.

A caffe-style stem (5x5/2 then 3x3) and three stages of basic blocks; the head is a 1x1 conv to the 62
params followed by global average pooling, not a Linear layer.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or inplanes != planes:
        conv = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        down = nn.Sequential(conv, nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, down)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet22(nn.Module):
    """[N,3,H,W] -> [N,num_classes]; stages of 3, 4, 3 basic blocks (128, 256, 512 channels)."""

    def __init__(self, num_classes: int = 62, layers: tuple[int, int, int] = (3, 4, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.layer1 = _stage(64, 128, layers[0], 2)
        self.layer2 = _stage(128, 256, layers[1], 2)
        self.layer3 = _stage(256, 512, layers[2], 2)
        self.conv_param = nn.Conv2d(512, num_classes, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(self.conv_param(x)).flatten(1)
