"""The fused landmark head (``head="landmarks"``): the network followed by de-normalisation and the 68-point
reconstruction inside the graph, so a deployment needs no BFM tables or numpy post-processing."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge3dfa import runtime

#: node-name prefix of the head in a TorchScript export (the module attribute ``head``): kept float in int8
HEAD_PREFIX = "/head/"


def landmark_head_module(model: Any) -> Any:
    """``model`` followed by de-normalisation and the 68-point reconstruction: [N,3,120,120] -> [N,3,68].

    Output is in 120x120 crop pixels exactly as ``runtime.to_image(reconstruct(denormalise(p)), [0,0,120,120])``:
    x - 1, 120 - y, z - 1 shifted so each face's minimum depth is 0. De-normalisation of alpha is folded
    into the bases (one MatMul); the camera's de-normalisation, y flip and offsets into one Mul + Add.
    """
    import torch

    bfm = runtime.load_bfm68()
    size = float(runtime.INPUT_SIZE)
    flip = np.array([1.0, -1.0, 1.0])[:, None]
    cam_std = (bfm.param_std[:12].reshape(3, 4) * flip).astype(np.float64)
    cam_mean = bfm.param_mean[:12].reshape(3, 4) * flip
    cam_mean = cam_mean + np.array([[0, 0, 0, -1.0], [0, 0, 0, size], [0, 0, 0, -1.0]])
    std_a, mean_a = bfm.param_std[12:].astype(np.float64), bfm.param_mean[12:].astype(np.float64)
    w = bfm.w.astype(np.float64)  # [50, 204]
    w_fold = std_a[:, None] * w
    u_fold = bfm.u.astype(np.float64) + mean_a @ w

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a, np.float32))

    class LandmarkHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cam_std", t(cam_std.reshape(1, 3, 4)))
            self.register_buffer("cam_mean", t(cam_mean.reshape(1, 3, 4)))
            self.register_buffer("w", t(w_fold))
            self.register_buffer("u", t(u_fold))

        def forward(self, p: torch.Tensor) -> torch.Tensor:
            cam = p[:, :12].reshape(-1, 3, 4) * self.cam_std + self.cam_mean
            shape = (p[:, 12:] @ self.w + self.u).reshape(-1, 68, 3).transpose(1, 2)  # [N,3,68]
            pts = cam[:, :, :3] @ shape + cam[:, :, 3:]
            z = pts[:, 2:] - pts[:, 2:].amin(dim=2, keepdim=True)
            return torch.cat([pts[:, :2], z], dim=1)

    class WithLandmarks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.head = LandmarkHead()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

    return WithLandmarks().eval()
