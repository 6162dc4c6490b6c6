"""The model zoo as plain data: every network edge3dfa builds, what it is for and where its weights come from.

Every network enters the zoo the same way (timm's registry): a ``ModelSpec`` with its ``task``, "regressor" (a
120x120 crop -> 62 3DMM params) or "detector" (FaceBoxes: an image -> face boxes). Code asks a spec for its task;
nothing elsewhere checks a model's name. No torch import at module level, so CLIs and docs can list models on
machines without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge3dfa.errors import Edge3dfaError

if TYPE_CHECKING:
    import torch

#: MobileNet-V3's two modes are two archs, as in torchvision and timm: a mode changes the layer table and the
#: key set (small 11 blocks, large 15), not just channel counts, so ``(arch, widen_factor)`` stays the whole
#: description of a network everywhere it is passed (``infer_arch``, ``build_model``, manifests, ``--arch``).
ARCHS = ("mobilenet_v1", "mobilenet_v3_small", "mobilenet_v3_large", "resnet22", "faceboxes")
TASKS = ("regressor", "detector")


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry; ``paper_*`` are the published figures (None where none were published), ``paper_source``
    says where they were published and which row they are."""

    name: str
    arch: str
    widen_factor: float
    input_size: int | None = 120  # None: any size (the detector)
    num_params: int = 62
    task: str = "regressor"  # "regressor" | "detector"
    checkpoint_asset: str | None = None
    paper_params_m: float | None = None
    paper_macs_m: float | None = None
    paper_source: str = ""
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mb1", "mobilenet_v1", 1.0, checkpoint_asset=None,
                  paper_params_m=3.27, paper_macs_m=183.5, paper_source="3DDFA_V2 README, MobileNet",
                  description="3DDFA_V2 default MobileNet-V1 (upstream mb1_120x120.pth, not in the assets)"),
        ModelSpec("mb05", "mobilenet_v1", 0.5, checkpoint_asset="mb05",
                  paper_params_m=0.85, paper_macs_m=49.5, paper_source="3DDFA_V2 README, MobileNet x0.5",
                  description="3DDFA_V2 MobileNet-V1 x0.5, upstream mb05_120x120.pth"),
        # Upstream's default MobileNet-V3 mode; no published figures describe it (the paper's row is large mode).
        ModelSpec("mbv3_05", "mobilenet_v3_small", 0.5, checkpoint_asset=None,
                  description="MobileNet-V3-small x0.5 in upstream's layout (upstream's default mode); "
                              "no public weights"),
        # 3DDFA_V2 paper Table 1 "MobileNet-V3 x0.5" (1.65M params, 27.4M MACs, 3.61 NME); its Fig. 3 caption
        # names the large mode. How the computed counts compare: README "Model zoo".
        ModelSpec("mbv3_large_05", "mobilenet_v3_large", 0.5, checkpoint_asset=None,
                  paper_params_m=1.65, paper_macs_m=27.4,
                  paper_source="3DDFA_V2 paper Table 1, MobileNet-V3 x0.5 (large mode, Fig. 3)",
                  description="MobileNet-V3-large x0.5 in upstream's layout, the paper's MobileNet-V3 x0.5; "
                              "no public weights"),
        ModelSpec("resnet22", "resnet22", 1.0, checkpoint_asset=None,
                  description="upstream resnet22 (caffe-style ResNet, 1x1 conv head); no public weights"),
        ModelSpec("faceboxes", "faceboxes", 1.0, input_size=None, num_params=0, task="detector",
                  checkpoint_asset="faceboxes",
                  description="FaceBoxes face detector as shipped with 3DDFA_V2 (FaceBoxesProd.pth)"),
    )
}
ARCH_TASKS = {"faceboxes": "detector"}  # every other arch is a regressor


def task_of(arch: str) -> str:
    """"detector" or "regressor" for an arch name."""
    return ARCH_TASKS.get(arch, "regressor")


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
    if arch in ("mobilenet_v3_small", "mobilenet_v3_large"):
        from edge3dfa.models.mobilenet_v3 import MobileNetV3

        mode = arch.removeprefix("mobilenet_v3_")
        return MobileNetV3(widen_factor=widen_factor, num_classes=num_params, mode=mode)
    if arch == "faceboxes":
        from edge3dfa.models.faceboxes import FaceBoxesNet

        return FaceBoxesNet()
    if arch == "resnet22":
        if widen_factor != 1.0:
            raise Edge3dfaError(f"resnet22 has no width multiplier (got widen_factor={widen_factor})")
        from edge3dfa.models.resnet import ResNet22

        return ResNet22(num_classes=num_params)
    raise Edge3dfaError(
        f"unknown model or arch {arch_or_name!r}; models: {', '.join(MODELS)}; archs: {', '.join(ARCHS)}"
    )
