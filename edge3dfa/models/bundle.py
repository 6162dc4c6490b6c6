"""The bundle as one PyTorch module, which every format converts: image in, landmarks, pose and params out.

``regressor_bundle`` wraps a 3DDFA regressor: a uint8 crop (NHWC, or NCHW float 0..255 for CoreML's ImageType)
-> channel order, ``(x - 127.5) / 128`` -> the network -> ``PostProcess``. ``PostProcess`` is the one
post-processing in the graph (the ONNX ``head=landmarks`` option uses it too): de-normalisation, the 68-point
reconstruction, the crop frame of ``edge3dfa.runtime.to_image`` for the roi (0, 0, 120, 120), and the pose of
``edge3dfa.runtime.pose``, written with ops every format has (atan2, sqrt, where; no asin, no data-dependent
control flow), checked against the runtime in ``tests/test_bundle.py``.

``detector_bundle`` wraps FaceBoxes at a fixed input size: uint8 image -> mean subtraction -> the network ->
prior decoding (priors are constants of the size) -> boxes in input pixels and face scores. NMS is added by the
formats that have an op for it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edge3dfa import runtime


def _t(a: np.ndarray) -> Any:
    import torch

    return torch.tensor(np.asarray(a, np.float32))


def post_process_module(landmarks_only: bool = False) -> Any:
    """Normalised params [N,62] -> (landmarks [N,68,3] crop px, pose [N,3] degrees, params [N,62] de-normalised).

    ``landmarks_only``: the landmarks alone, as [N,3,68] (the ONNX ``head=landmarks`` output, kept as it was).
    De-normalisation of alpha is folded into the bases (one MatMul); the camera's de-normalisation, the y flip
    and the 1-pixel offsets into one Mul + Add.
    """
    import torch

    bfm = runtime.load_bfm68()
    size = float(runtime.INPUT_SIZE)
    flip = np.array([1.0, -1.0, 1.0])[:, None]
    cam_std = bfm.param_std[:12].reshape(3, 4).astype(np.float64) * flip
    cam_mean = bfm.param_mean[:12].reshape(3, 4) * flip + np.array([[0, 0, 0, -1.0], [0, 0, 0, size],
                                                                    [0, 0, 0, -1.0]])
    w = bfm.w.astype(np.float64)  # [50, 204]
    w_fold = bfm.param_std[12:].astype(np.float64)[:, None] * w
    u_fold = bfm.u.astype(np.float64) + bfm.param_mean[12:].astype(np.float64) @ w

    class PostProcess(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cam_std", _t(cam_std.reshape(1, 3, 4)))
            self.register_buffer("cam_mean", _t(cam_mean.reshape(1, 3, 4)))
            self.register_buffer("w", _t(w_fold))
            self.register_buffer("u", _t(u_fold))
            self.register_buffer("p_std", _t(bfm.param_std.reshape(1, -1)))
            self.register_buffer("p_mean", _t(bfm.param_mean.reshape(1, -1)))

        def forward(self, p: torch.Tensor) -> Any:
            cam = p[:, :12].reshape(-1, 3, 4) * self.cam_std + self.cam_mean  # y already flipped
            shape = (p[:, 12:] @ self.w + self.u).reshape(-1, 68, 3).transpose(1, 2)  # [N,3,68]
            pts = cam[:, :, :3] @ shape + cam[:, :, 3:]
            z = pts[:, 2:] - pts[:, 2:].amin(dim=2, keepdim=True)
            lms = torch.cat([pts[:, :2], z], dim=1)
            if landmarks_only:
                return lms
            params = p * self.p_std + self.p_mean
            return lms.transpose(1, 2), pose_degrees(params[:, :12].reshape(-1, 3, 4)), params

    return PostProcess().eval()


def pose_degrees(cam: Any) -> Any:
    """De-normalised camera [N,3,4] -> yaw, pitch, roll [N,3] in degrees, as ``runtime.pose`` (upstream's
    ``matrix2angle`` of the orthonormalised rotation, gimbal-lock branches included).

    asin(s) is written atan2(s, sqrt(1 - s^2)) and atan2(a / c, b / c) as atan2(a, b) (c = cos(yaw) >= 0), so
    the graph needs no asin and never divides by c.
    """
    import torch

    r1 = cam[:, 0, :3] / torch.linalg.vector_norm(cam[:, 0, :3], dim=1, keepdim=True)
    r2 = cam[:, 1, :3] / torch.linalg.vector_norm(cam[:, 1, :3], dim=1, keepdim=True)
    r20 = r1[:, 1] * r2[:, 2] - r1[:, 2] * r2[:, 1]  # third row = r1 x r2
    r21 = r1[:, 2] * r2[:, 0] - r1[:, 0] * r2[:, 2]
    r22 = r1[:, 0] * r2[:, 1] - r1[:, 1] * r2[:, 0]
    s = torch.clamp(r20, -1.0, 1.0)
    yaw = torch.atan2(s, torch.sqrt(torch.clamp(1.0 - s * s, min=0.0)))
    pitch = torch.atan2(r21, r22)
    roll = torch.atan2(r2[:, 0], r1[:, 0])
    up, down = r20 > 0.998, r20 < -0.998
    half_pi = torch.full_like(yaw, math.pi / 2)
    yaw = torch.where(up, half_pi, torch.where(down, -half_pi, yaw))
    pitch = torch.where(up, torch.atan2(-r1[:, 1], -r1[:, 2]),
                        torch.where(down, torch.atan2(r1[:, 1], r1[:, 2]), pitch))
    # |R20| > 0.998 rather than up | down: aten::__or__ has no CoreML converter and LOGICAL_OR no TFLite GPU kernel
    roll = torch.where(torch.abs(r20) > 0.998, torch.zeros_like(roll), roll)
    return torch.stack([yaw, pitch, roll], dim=1) * (180.0 / math.pi)


def regressor_bundle(net: Any, channels: str = "bgr", layout: str = "NHWC") -> Any:
    """``net`` as a bundle: image [N,120,120,3] uint8 (``layout="NHWC"``) or [N,3,120,120] float 0..255
    (``"NCHW"``, for CoreML's ImageType) in ``channels`` order -> (landmarks, pose, params)."""
    import torch

    class RegressorBundle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.head = post_process_module()

        def forward(self, image: torch.Tensor) -> Any:
            x = image.to(torch.float32)
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            if channels == "rgb":
                x = x.flip(1)
            return self.head(self.net((x - 127.5) * (1.0 / 128.0)))

    return RegressorBundle().eval()


def detector_bundle(net: Any, height: int, width: int, channels: str = "bgr", layout: str = "NHWC") -> Any:
    """FaceBoxes ``net`` at a fixed ``height`` x ``width`` as a bundle: image [1,H,W,3] uint8 (or [1,3,H,W] float
    0..255 for ``layout="NCHW"``) -> boxes [P,4] (x1, y1, x2, y2 in input pixels), scores [P], before NMS."""
    import torch

    from edge3dfa.runtime.detect import MEAN_BGR, VARIANCES, prior_boxes

    priors = prior_boxes(height, width).astype(np.float64) * np.array([width, height, width, height])
    mean = np.asarray(MEAN_BGR if channels == "bgr" else MEAN_BGR[::-1], np.float32).reshape(1, 3, 1, 1)

    class DetectorBundle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", _t(mean))
            # one [P,4] constant: litert-torch 0.10 merged two distinct [P,2] constants into one in some processes
            self.register_buffer("priors", _t(priors))

        def forward(self, image: torch.Tensor) -> Any:
            x = image.to(torch.float32)
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            x = x - self.mean
            if channels == "rgb":
                x = x.flip(1)
            loc, conf = self.net(x)
            prior_size = self.priors[:, 2:]
            centre = self.priors[:, :2] + loc[0, :, :2] * VARIANCES[0] * prior_size
            size = prior_size * torch.exp(loc[0, :, 2:] * VARIANCES[1])
            top_left = centre - size / 2
            return torch.cat([top_left, top_left + size], dim=1), conf[0, :, 1]

    return DetectorBundle().eval()
