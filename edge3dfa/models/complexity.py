"""Parameter and multiply-accumulate counts, to check models against the published figures.

MACs count only Conv2d and Linear (out elements x in_ch/groups x kh x kw), the convention of the usual
counters (thop, ptflops conv/linear part) the 3DDFA_V2 numbers were made with: BN, activations, pooling,
SE rescaling and residual adds are left out, as they are folded away or are a rounding error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def count_params(model: torch.nn.Module) -> int:
    """Every parameter of the model (BN affine included, running stats excluded as they are buffers)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_size: int = 120) -> int:
    """MACs of one forward pass on a 1x3xSxS input, from forward hooks on Conv2d and Linear."""
    import torch

    total = 0

    def conv_hook(m: torch.nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: torch.nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
