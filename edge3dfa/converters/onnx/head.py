"""The fused landmark head (``head="landmarks"``): the network followed by de-normalisation and the 68-point
reconstruction inside the graph, so a deployment needs no BFM tables or numpy post-processing.

The head is the phone bundle's post-processing (``edge3dfa.models.bundle.post_process_module``), its landmarks
alone, in the [N,3,68] layout this option has always output; ``--bundle`` gives the full contract."""

from __future__ import annotations

from typing import Any

#: node-name prefix of the head in a TorchScript export (the module attribute ``head``): kept float in int8
HEAD_PREFIX = "/head/"


def landmark_head_module(model: Any) -> Any:
    """``model`` followed by de-normalisation and the 68-point reconstruction: [N,3,120,120] -> [N,3,68].

    Output is in 120x120 crop pixels exactly as ``runtime.to_image(reconstruct(denormalise(p)), [0,0,120,120])``.
    """
    import torch

    from edge3dfa.models.bundle import post_process_module

    class WithLandmarks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.head = post_process_module(landmarks_only=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

    return WithLandmarks().eval()
