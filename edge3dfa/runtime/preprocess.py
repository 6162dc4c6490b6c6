"""Face box -> roi -> 120x120 normalised crop, as upstream 3DDFA_V2 (utils/functions.py) does it.

The roi rules and the zero-padded crop are upstream's exactly: the checkpoints were trained on crops
made this way, and any drift here shows up as landmark error on device.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import printable

INPUT_SIZE = 120


def as_bgr_uint8(img: np.ndarray) -> np.ndarray:
    """Any decoded image (gray, BGRA, 16-bit, float in [0,1]) -> HxWx3 uint8 BGR; converts, never crashes."""
    if img is None or not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise Edge3dfaError("not an image: expected an HxW or HxWxC array")
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.shape[2] != 3:
        raise Edge3dfaError(f"unsupported number of channels: {img.shape[2]}")
    return np.ascontiguousarray(img)


#: decode flags: keep 16-bit and grayscale (as_bgr_uint8 converts them) and apply the EXIF orientation.
#: IMREAD_UNCHANGED would keep alpha but ignores EXIF orientation (OpenCV applies it for every other flag),
#: so a portrait phone photo would be read lying on its side, where the detector finds no face.
DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def decode_image(data: bytes | np.ndarray, name: str | os.PathLike = "image") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> HxWx3 uint8 BGR, EXIF orientation applied; ``name`` is for errors."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        img = cv2.imdecode(buf, DECODE_FLAGS) if buf.size else None
    except cv2.error as e:  # e.g. a header claiming more pixels than OpenCV's limit (a decompression bomb)
        why = ("larger than OpenCV decodes (CV_IO_MAX_IMAGE_PIXELS)" if "MAX_IMAGE_PIXELS" in str(e)
               else " ".join(str(e).split(" error: ", 1)[-1].split())[:160])
        raise Edge3dfaError(f"cannot decode image {printable(name)}: {why}") from None
    if img is None:
        raise Edge3dfaError(f"cannot read image {printable(name)}: empty, truncated or not an image")
    return as_bgr_uint8(img)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image OpenCV decodes as BGR uint8 (16-bit, RGBA and grayscale files are converted; EXIF
    orientation applied). The bytes are read by Python, so any file name works (cv2.imread needs UTF-8 names)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise Edge3dfaError(f"cannot read image {printable(path)}: {e.strerror or e}") from None
    return decode_image(data, path)


def roi_from_box(boxes: np.ndarray) -> np.ndarray:
    """Detector boxes [N,>=4] (x1,y1,x2,y2) -> square roi boxes [N,4]: 1.58x the mean side, shifted down 0.14."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, boxes.shape[-1])[:, :4]
    old_size = (b[:, 2] - b[:, 0] + b[:, 3] - b[:, 1]) / 2
    cx = b[:, 2] - (b[:, 2] - b[:, 0]) / 2
    cy = b[:, 3] - (b[:, 3] - b[:, 1]) / 2 + old_size * 0.14
    size = np.trunc(old_size * 1.58)  # upstream: int(old_size * 1.58)
    x1, y1 = cx - size / 2, cy - size / 2
    return np.stack([x1, y1, x1 + size, y1 + size], axis=1)


def roi_from_landmarks(pts: np.ndarray) -> np.ndarray:
    """Landmarks [N,>=2,68] in image pixels -> roi boxes [N,4]: square of the diagonal of their bounding square.

    Used to re-crop from the previous frame's landmarks when tracking video.
    """
    p = np.asarray(pts, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    x0, y0 = p[:, 0].min(1), p[:, 1].min(1)
    x1, y1 = p[:, 0].max(1), p[:, 1].max(1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = np.maximum(x1 - x0, y1 - y0) / 2
    llength = np.sqrt(2.0) * 2 * radius
    return np.stack([cx - llength / 2, cy - llength / 2, cx + llength / 2, cy + llength / 2], axis=1)


def crop(img: np.ndarray, roi_box: np.ndarray) -> np.ndarray:
    """Crop ``roi_box`` (rounded to ints) out of ``img``; parts outside the image are zero-padded."""
    h, w = img.shape[:2]
    sx, sy, ex, ey = (int(round(float(v))) for v in roi_box[:4])
    if ex <= sx or ey <= sy:
        raise Edge3dfaError(f"empty roi box {list(map(float, roi_box[:4]))}")
    out = np.zeros((ey - sy, ex - sx) + img.shape[2:], dtype=img.dtype)
    cx0, cy0, cx1, cy1 = max(sx, 0), max(sy, 0), min(ex, w), min(ey, h)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - sy:cy1 - sy, cx0 - sx:cx1 - sx] = img[cy0:cy1, cx0:cx1]
    return out


def normalise(crops: np.ndarray) -> np.ndarray:
    """uint8 BGR crops [N,H,W,3] -> float32 [N,3,H,W] with (x - 127.5) / 128, the checkpoints' input."""
    x = np.asarray(crops, dtype=np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.5) / 128.0)


def crops_from_rois(img: np.ndarray, roi_boxes: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """All faces of one image -> network input [N,3,size,size] float32 (bilinear resize as upstream)."""
    img = as_bgr_uint8(img)
    resized = [cv2.resize(crop(img, r), (size, size), interpolation=cv2.INTER_LINEAR) for r in roi_boxes]
    if not resized:
        return np.zeros((0, 3, size, size), np.float32)
    return normalise(np.stack(resized))
