"""FaceBoxes face detection around any runtime: pre-processing, priors, box decoding and NMS in numpy.

The network itself (edge3dfa.models.faceboxes) is only a convolution graph; everything data-dependent
(anchors, decoding, thresholds, NMS) is here, so the same detector runs with torch on a PC and with
onnxruntime or TFLite on a Raspberry Pi where torch is not installed. Every rule and constant follows
3DDFA_V2's FaceBoxes/FaceBoxes.py, so boxes match upstream's and the 3DDFA rois built from them too.
This module must never import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.runtime.preprocess import as_bgr_uint8

MEAN_BGR = (104.0, 117.0, 123.0)
# Upstream shrinks larger images to fit 720 rows x 1080 columns: faster, and how its thresholds were tuned.
MAX_HEIGHT, MAX_WIDTH = 720, 1080
#: upstream's detection rules (FaceBoxesDetector's defaults, and what detector bundles put in their graph):
#: candidates scoring above CONFIDENCE_THRESHOLD, the best TOP_K into greedy NMS at NMS_THRESHOLD, the best
#: KEEP_TOP_K kept, faces reported above SCORE_THRESHOLD
CONFIDENCE_THRESHOLD, TOP_K, NMS_THRESHOLD, KEEP_TOP_K, SCORE_THRESHOLD = 0.05, 5000, 0.3, 750, 0.5
#: the fixed input (H, W) of the detectors exported at one size (TFLite's, and every detector bundle)
FIXED_SIZE = (480, 640)
STEPS = (32, 64, 128)
MIN_SIZES = ((32, 64, 128), (256,), (512,))
# Small anchors are tiled densely (4x4 and 2x2 per cell) so they are spaced like the big ones.
DENSE_OFFSETS = {32: (0.0, 0.25, 0.5, 0.75), 64: (0.0, 0.5)}
VARIANCES = (0.1, 0.2)

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def prior_boxes(height: int, width: int) -> np.ndarray:
    """Anchors [P,4] float32 (cx, cy, w, h), normalised by the input size, in the network's output order.

    Order is (source, row, col, anchor), anchors of a cell by min size then row-major dense offsets, as
    upstream's PriorBox enumerates them; feature maps are ceil(size / step) as the strided convs give.
    """
    if height < 1 or width < 1:
        raise Edge3dfaError(f"prior_boxes needs a positive size, got {height}x{width}")
    out = []
    for step, min_sizes in zip(STEPS, MIN_SIZES):
        fh, fw = -(-height // step), -(-width // step)
        rows, cols = np.meshgrid(np.arange(fh, dtype=np.float64), np.arange(fw, dtype=np.float64),
                                 indexing="ij")
        cell = []
        for m in min_sizes:
            offs = np.asarray(DENSE_OFFSETS.get(m, (0.5,)))
            oy, ox = np.meshgrid(offs, offs, indexing="ij")       # cy outer, cx inner
            oy, ox = oy.ravel(), ox.ravel()
            cx = (cols[..., None] + ox) * step / width           # [fh, fw, n]
            cy = (rows[..., None] + oy) * step / height
            wh = np.broadcast_to(np.array([m / width, m / height]), cx.shape + (2,))
            cell.append(np.concatenate([cx[..., None], cy[..., None], wh], axis=-1))
        out.append(np.concatenate(cell, axis=2).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode(loc: np.ndarray, priors: np.ndarray, variances: tuple[float, float] = VARIANCES) -> np.ndarray:
    """Regression offsets [P,4] + priors [P,4] (cx,cy,w,h) -> boxes [P,4] (x1,y1,x2,y2), same units as priors.

    SSD encoding: centre shift in units of variance[0] * prior size, log size ratio over variance[1].
    """
    loc = np.asarray(loc, dtype=np.float32)
    priors = np.asarray(priors, dtype=np.float32)
    centre = priors[:, :2] + loc[:, :2] * np.float32(variances[0]) * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * np.float32(variances[1]))
    top_left = centre - size / 2
    return np.concatenate([top_left, size + top_left], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N,M] of boxes a [N,>=4] and b [M,>=4] (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64)[:, None, :4], np.asarray(b, np.float64)[None, :, :4]
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area - inter, 1e-9)


def nms(dets: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on dets [N,5] (x1,y1,x2,y2,score) -> kept indices, best score first.

    Same result as upstream's cpu_nms (Fast R-CNN): float32 boxes, areas with the +1 pixel convention,
    a box is dropped when its IoU with a kept box is >= the threshold, score ties broken by argsort.
    """
    dets = np.asarray(dets, dtype=np.float32)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise Edge3dfaError(f"nms expects dets [N,5] (x1,y1,x2,y2,score), got shape {dets.shape}")
    x1, y1, x2, y2, scores = (dets[:, k] for k in range(5))
    one, zero = np.float32(1), np.float32(0)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        # Compare in float64 as the Cython original does (float32 IoU promoted against a double threshold).
        order = rest[iou.astype(np.float64) < float(iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def prepare(img_bgr: np.ndarray, input_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """BGR uint8 image -> (blob [1,3,H,W] float32 minus the BGR mean, scale of the blob vs the image).

    input_size None: upstream's rule, shrink (never enlarge) to fit 720x1080, size varies per image.
    input_size (H, W): for models exported at a fixed size; shrink to fit inside it the same way, then pad
    bottom/right with the mean (zeros after subtraction), so boxes need no offset.
    """
    img = as_bgr_uint8(img_bgr)
    h, w = img.shape[:2]
    max_h, max_w = (MAX_HEIGHT, MAX_WIDTH) if input_size is None else input_size
    scale = 1.0
    if h > max_h:
        scale = max_h / h
    if w * scale > max_w:
        scale *= max_w / (w * scale)
    if scale != 1.0:
        img = cv2.resize(img, (max(1, int(scale * w)), max(1, int(scale * h))))
    x = img.astype(np.float32) - np.asarray(MEAN_BGR, dtype=np.float32)
    if input_size is not None:
        pad = np.zeros((max_h, max_w, 3), np.float32)
        pad[:x.shape[0], :x.shape[1]] = x
        x = pad
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), scale


#: what a detector's ``forward`` returns: raw network outputs (loc, conf), or a detector bundle's decoded (boxes,
#: scores) in input pixels, before NMS ("boxes") or after the NMS in the model ("boxes+nms")
OUTPUTS = ("loc_conf", "boxes", "boxes+nms")


def nms_in_model(contract: dict[str, Any]) -> bool:
    """Whether a detector bundle's contract (``edge3dfa.bundle.detector_contract``) says NMS runs in the model: its
    ``nms_in_model`` flag (the ``nms`` text is for people; each format words it its own way)."""
    return contract.get("nms_in_model") is True


class FaceBoxesDetector:
    """img_bgr -> face boxes [K,5] float32 (x1,y1,x2,y2,score) in image pixels, best score first.

    ``forward`` is any runtime (torch via models.faceboxes.torch_forward, onnxruntime, TFLite) mapping the
    blob [1,3,H,W] to (loc [1,P,4], conf [1,P,2] softmax); priors are cached per blob size. Defaults are
    upstream's (``CONFIDENCE_THRESHOLD``, ``TOP_K``, ``NMS_THRESHOLD``, ``KEEP_TOP_K``, ``SCORE_THRESHOLD``).
    ``name`` (e.g. the target's) names the model in errors. ``outputs`` (``OUTPUTS``) says what ``forward``
    returns: a detector bundle decodes in the model (boxes [K,4] in input pixels, scores [K]), and with NMS in the
    model only the score threshold is applied here (a threshold below the model's cannot bring faces back).
    """

    def __init__(self, forward: Forward, score_threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, confidence_threshold: float = CONFIDENCE_THRESHOLD,
                 top_k: int = TOP_K, keep_top_k: int = KEEP_TOP_K,
                 input_size: tuple[int, int] | None = None, name: str = "detector model",
                 outputs: str = "loc_conf") -> None:
        if outputs not in OUTPUTS:
            raise Edge3dfaError(f"detector outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        self.forward = forward
        self.outputs = outputs
        self.name = name
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.confidence_threshold = confidence_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k
        self.input_size = input_size
        self._priors: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def of_target(cls, target: Any, **options: Any) -> FaceBoxesDetector:
        """The detector around a FaceBoxes ``Target`` (anything with ``run``, ``input_shape`` and ``name``): a model
        exported at a fixed size (e.g. TFLite's 480x640) gets every photo shrunk and padded to that size, one of
        any size gets upstream's shrink-to-fit. Every caller goes through here, so none can forget the size.
        ``options``: the thresholds of ``__init__``."""
        shape = tuple(target.input_shape[1:])
        fixed = shape if shape and None not in shape else None
        contract = getattr(target, "bundle", None)
        if contract and contract.get("kind") != "detector":
            raise Edge3dfaError(f"{target.name} is a {contract.get('kind')} bundle, not a face detector")
        outputs = "loc_conf" if not contract else "boxes+nms" if nms_in_model(contract) else "boxes"
        return cls(lambda blob: tuple(target.run(blob)[:2]), input_size=fixed, name=target.name, outputs=outputs,
                   **options)

    def priors(self, height: int, width: int) -> np.ndarray:
        """prior_boxes for a blob size, computed once."""
        key = (height, width)
        if key not in self._priors:
            self._priors[key] = prior_boxes(height, width)
        return self._priors[key]

    def __call__(self, img_bgr: np.ndarray) -> np.ndarray:
        blob, scale = prepare(img_bgr, self.input_size)
        outs = tuple(self.forward(blob))
        if len(outs) != 2:  # e.g. a landmark model given as the detector: one output, [N,62] params
            raise Edge3dfaError(f"{self.name}: returned {len(outs)} output(s), where a FaceBoxes detector returns 2 "
                                "(box offsets and scores); is it a landmark model rather than a face detector?")
        if self.outputs != "loc_conf":
            return self._from_bundle(*outs, scale)
        height, width = blob.shape[2:]
        priors = self.priors(height, width)
        loc, conf = outs
        loc = np.asarray(loc, dtype=np.float32).reshape(-1, 4)
        conf = np.asarray(conf, dtype=np.float32)
        if loc.shape[0] != priors.shape[0] or conf.size != 2 * priors.shape[0]:
            raise Edge3dfaError(
                f"{self.name} returned {loc.shape[0]} boxes for a {height}x{width} input, expected "
                f"{priors.shape[0]}; a model exported at a fixed size needs input_size=(H, W) of that size")
        scores = conf.reshape(-1, 2)[:, 1]
        boxes = decode(loc, priors) * np.array([width, height, width, height], np.float32) / np.float32(scale)
        return self._select(boxes, scores)

    def _select(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Upstream's rules on decoded boxes [P,4] and scores [P]: candidates, NMS, the best, the threshold."""
        idx = np.flatnonzero(scores > self.confidence_threshold)
        idx = idx[scores[idx].argsort()[::-1][:self.top_k]]
        dets = np.hstack([boxes[idx], scores[idx, None]]).astype(np.float32)
        dets = dets[nms(dets, self.nms_threshold)][:self.keep_top_k]
        return np.ascontiguousarray(dets[dets[:, 4] > self.score_threshold])

    def _from_bundle(self, boxes: Any, scores: Any, scale: float) -> np.ndarray:
        """A detector bundle's boxes [K,4] (input pixels) and scores [K] -> dets [K,5] in image pixels; NMS here
        only when the model has none."""
        boxes = np.asarray(boxes, np.float32)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if boxes.ndim != 2 or boxes.shape != (len(scores), 4):
            raise Edge3dfaError(f"{self.name}: a detector bundle returns boxes [K,4] and scores [K], got "
                                f"{list(boxes.shape)} and {list(scores.shape)}")
        boxes = boxes / np.float32(scale)
        if self.outputs == "boxes":
            return self._select(boxes, scores)
        dets = np.hstack([boxes, scores[:, None]]).astype(np.float32)
        dets = dets[np.argsort(-dets[:, 4], kind="stable")]  # best first, as the runtime's
        return np.ascontiguousarray(dets[dets[:, 4] > self.score_threshold])
