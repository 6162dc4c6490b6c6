"""The model zoo as plain data: what each 3DDFA_V2 regressor is and where its weights come from.

No torch import at module level, so CLIs and docs can list models on machines without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge3dfa.errors import Edge3dfaError

if TYPE_CHECKING:
    import torch

ARCHS = ("mobilenet_v1", "mobilenet_v3", "resnet22")


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry; ``paper_*`` are the published figures (None where none were published)."""

    name: str
    arch: str
    widen_factor: float
    input_size: int = 120
    num_params: int = 62
    checkpoint_asset: str | None = None
    paper_params_m: float | None = None
    paper_macs_m: float | None = None
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mb1", "mobilenet_v1", 1.0, checkpoint_asset=None,
                  paper_params_m=3.27, paper_macs_m=183.5,
                  description="3DDFA_V2 default MobileNet-V1 (upstream mb1_120x120.pth, not in the assets)"),
        ModelSpec("mb05", "mobilenet_v1", 0.5, checkpoint_asset="mb05",
                  paper_params_m=0.85, paper_macs_m=49.5,
                  description="3DDFA_V2 MobileNet-V1 x0.5, upstream mb05_120x120.pth"),
        # 1.65M / 27.4M are the figures quoted for MobileNet-V3 in the 3DDFA_V2 comparison; the x0.5 net has
        # 0.70M params (fixture README: 701,094) and x1.0 has 1.74M, so they most likely describe x1.0.
        ModelSpec("mbv3_05", "mobilenet_v3", 0.5, checkpoint_asset=None,
                  paper_params_m=1.65, paper_macs_m=27.4,
                  description="MobileNet-V3-small x0.5 in upstream's layout; no public weights"),
        ModelSpec("resnet22", "resnet22", 1.0, checkpoint_asset=None,
                  description="upstream resnet22 (caffe-style ResNet, 1x1 conv head); no public weights"),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The zoo entry called ``name``; a user error lists the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise Edge3dfaError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def build_model(arch_or_name: str, widen_factor: float | None = None) -> torch.nn.Module:
    """An untrained model from a zoo name (its arch and width) or an arch name (width default 1.0)."""
    spec = MODELS.get(arch_or_name)
    arch = spec.arch if spec else arch_or_name
    if widen_factor is None:
        widen_factor = spec.widen_factor if spec else 1.0
    num_params = spec.num_params if spec else 62
    if arch == "mobilenet_v1":
        from edge3dfa.models.mobilenet_v1 import MobileNetV1

        return MobileNetV1(widen_factor=widen_factor, num_classes=num_params)
    if arch == "mobilenet_v3":
        from edge3dfa.models.mobilenet_v3 import MobileNetV3Small

        return MobileNetV3Small(widen_factor=widen_factor, num_classes=num_params)
    if arch == "resnet22":
        if widen_factor != 1.0:
            raise Edge3dfaError(f"resnet22 has no width multiplier (got widen_factor={widen_factor})")
        from edge3dfa.models.resnet import ResNet22

        return ResNet22(num_classes=num_params)
    raise Edge3dfaError(
        f"unknown model or arch {arch_or_name!r}; models: {', '.join(MODELS)}; archs: {', '.join(ARCHS)}"
    )
