"""FaceBoxes (Zhang et al. 2017), the face detector 3DDFA_V2 ships with, rebuilt for export.

Layer names and state-dict keys are upstream's (3DDFA_V2 FaceBoxes/models/faceboxes.py) so that
FaceBoxesProd.pth loads strictly. The forward pass is upstream's test phase (softmax on the class logits)
written without data-dependent Python control flow or in-place ops, so one graph traces to ONNX, TFLite
and CoreML for any fixed input size. Priors, decoding and NMS live in the numpy runtime
(edge3dfa.runtime.detect), which is what runs on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge3dfa.errors import Edge3dfaError

NUM_CLASSES = 2
# Anchors per cell of each detection source: 32px x16 (4x4 dense), 64px x4 (2x2 dense), 128px x1;
# then one 256px and one 512px anchor on the coarser maps. Must agree with runtime.detect.prior_boxes.
ANCHORS_PER_CELL = (21, 1, 1)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> relu."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class CRelu(nn.Module):
    """conv -> batch norm -> concat(x, -x) -> relu: doubles channels at half the conv cost."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(torch.cat([x, -x], 1))


class Inception(nn.Module):
    """128 -> 4 x 32 channels: 1x1, avgpool+1x1, 3x3, and two stacked 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch1x1_2 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch3x3_reduce = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_reduce_2 = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3_2 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_3 = BasicConv2d(32, 32, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # count_include_pad=True (torch's default), as upstream trained; ONNX, TFLite and CoreML support it.
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch1x1_2(pooled),
            self.branch3x3(self.branch3x3_reduce(x)),
            self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x))),
        ], 1)


class FaceBoxesNet(nn.Module):
    """x [N,3,H,W] float32, BGR minus (104,117,123) -> (loc [N,P,4], conf [N,P,2] softmax probabilities).

    P is runtime.detect.prior_boxes(H, W).shape[0]; every stride rounds up, so any H, W works.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = CRelu(3, 24, kernel_size=7, stride=4, padding=3)
        self.conv2 = CRelu(48, 64, kernel_size=5, stride=2, padding=2)
        self.inception1 = Inception()
        self.inception2 = Inception()
        self.inception3 = Inception()
        self.conv3_1 = BasicConv2d(128, 128, kernel_size=1, stride=1, padding=0)
        self.conv3_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv4_1 = BasicConv2d(256, 128, kernel_size=1, stride=1, padding=0)
        self.conv4_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        channels = (128, 256, 256)
        self.loc = nn.Sequential(*[nn.Conv2d(c, a * 4, kernel_size=3, padding=1)
                                   for c, a in zip(channels, ANCHORS_PER_CELL)])
        self.conf = nn.Sequential(*[nn.Conv2d(c, a * num_classes, kernel_size=3, padding=1)
                                    for c, a in zip(channels, ANCHORS_PER_CELL)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)
        s1 = self.inception3(self.inception2(self.inception1(x)))   # stride 32
        s2 = self.conv3_2(self.conv3_1(s1))                         # stride 64
        s3 = self.conv4_2(self.conv4_1(s2))                         # stride 128
        n = x.shape[0]
        # NHWC flattening: prior order is (source, row, col, anchor), as prior_boxes enumerates them.
        loc = torch.cat([head(s).permute(0, 2, 3, 1).reshape(n, -1, 4)
                         for head, s in zip(self.loc, (s1, s2, s3))], 1)
        conf = torch.cat([head(s).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes)
                          for head, s in zip(self.conf, (s1, s2, s3))], 1)
        return loc, torch.softmax(conf, dim=-1)


def load_faceboxes(path: str | Path | None = None) -> FaceBoxesNet:
    """FaceBoxesNet in eval mode with strictly loaded weights (default: the upstream FaceBoxesProd.pth asset).

    Strict loading: a wrong or partial checkpoint must fail here, not detect nothing later.
    """
    from edge3dfa.models.checkpoint import Checkpoint

    try:
        return Checkpoint.open(path if path is not None else "faceboxes", arch="faceboxes").load()
    except Edge3dfaError as e:
        raise Edge3dfaError(f"not a FaceBoxes checkpoint (as 3DDFA_V2's FaceBoxesProd.pth): {e}") from None


def torch_forward(model: nn.Module) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Wrap a FaceBoxesNet as the numpy callable FaceBoxesDetector takes, like any other runtime."""
    model.eval()

    def forward(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            loc, conf = model(torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32)))
        return loc.numpy(), conf.numpy()

    return forward
