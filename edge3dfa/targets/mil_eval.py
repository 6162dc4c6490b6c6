"""A numpy evaluator for CoreML ML programs (MIL), so a converted ``.mlpackage`` can be checked on Linux.

CoreML's own ``predict`` exists only on macOS. This module reads the program and its weights back from a
SAVED package (coremltools' milproto loader and its weight.bin reader both work on Linux) and executes the
ops one by one in numpy, in program order, with the semantics of the MIL op specification
(coremltools.converters.mil.mil.ops.defs). Every op output is checked against the shape the program
declares, so a mis-modelled op fails loudly instead of drifting quietly; an op the evaluator does not
implement is refused when the program is opened, by name, never skipped.

What is modelled:
  * fp16 programs (compute_precision=FLOAT16): every tensor is stored as float16 exactly where the program
    types it fp16 (weights, and each op's output is rounded to float16, round-to-nearest-even), as CoreML
    stores fp16 activations between ops. fp32 programs run in float32 throughout.
  * weight decompression (constexpr_affine_dequantize, constexpr_blockwise_shift_scale, constexpr_lut_to_dense
    in its iOS16 bit-packed and iOS18 per-group/vector forms, constexpr_cast), reproduced from the spec.
  * activation quantization (quantize / dequantize, iOS17): clip(round(x / scale) + zero_point), rounding half
    to even as coremltools' reference implementation does (the spec does not name CoreML's rounding mode).
  * image inputs: CoreML hands the program the image's planes in the input's color layout (``image_planes``);
    the ImageType's scale and bias are ops in the program.
  * non_maximum_suppression as its spec says (IoU > threshold suppressed, scores below the score threshold
    rejected, best first); the values of the padding rows and the order of score ties are unspecified there.
What is not modelled:
  * accumulation precision inside an op: convolutions, matmuls and reductions accumulate in float32 here,
    also for fp16 programs; CoreML's GPU / Neural Engine kernels may accumulate in fp16 or with other
    summation orders, so device outputs can differ by a few fp16 ulps per op from these.
  * which device runs what (CPU / GPU / ANE), ops CoreML fuses or runs in other precisions, and true int8
    arithmetic for int8 activations on the Neural Engine (here: fake-quantization, float compute between the pairs).
  * control flow (ops with nested blocks), states and multi-function packages other than ``main``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line

Observer = Callable[[str, np.ndarray], None]


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """Silence coremltools' import-time warnings (no CoreML runtime on Linux, untested torch) and progress bars."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Cap numpy's BLAS threads (threadpoolctl, when installed): the evaluator's matmuls are small, and on a
    loaded 2-core machine OpenBLAS' pool ran mb05 9x slower than one thread (133 vs 15 ms per crop)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it numpy's BLAS keeps its own thread count
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def import_coremltools() -> Any:
    """coremltools, imported quietly; a clear error if the coreml extra is not installed."""
    try:
        with quiet_coremltools():
            import coremltools
    except ImportError as e:
        raise Edge3dfaError(f"CoreML support needs coremltools ({e}); pip install 'edge3dfa[coreml]'") from e
    return coremltools


def load_program(path: str | os.PathLike) -> Any:
    """The pymil Program stored in a saved ``.mlpackage`` (read from disk, weights included)."""
    p = Path(path)
    if not p.exists():
        raise Edge3dfaError(f"CoreML package not found: {p}")
    if not p.is_dir() or not (p / "Manifest.json").is_file():
        raise Edge3dfaError(f"{p} is not an .mlpackage (a folder with Manifest.json)")
    ct = import_coremltools()
    try:
        with quiet_coremltools():
            model = ct.models.MLModel(str(p), skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - protobuf / package errors of every kind
        raise Edge3dfaError(f"{p}: unreadable CoreML package ({one_line(e, 160)})") from None
    return program_of(model, label=str(p))


def program_of(model: Any, label: str = "model") -> Any:
    """The pymil Program of an ``MLModel`` as serialised: its spec plus the weight files in its package."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise Edge3dfaError(f"{label}: not an ML program (model type {spec.WhichOneof('Type')})")
    try:
        with quiet_coremltools():
            return milproto.load(spec, spec.specificationVersion, model.weights_dir or "")
    except Exception as e:  # noqa: BLE001 - the blob reader raises ValueError/RuntimeError for bad weights
        raise Edge3dfaError(f"{label}: weights cannot be read, truncated or corrupted package? "
                            f"({one_line(e, 160)})") from None


def image_planes(rgb: np.ndarray, color_layout: str) -> np.ndarray:
    """What CoreML hands an ImageType input's program: an RGB image [H,W,3] uint8 (a PIL image; a CVPixelBuffer
    is read the same way by its pixel format) as float32 planes [1,3,H,W] in the input's ``color_layout`` ("RGB"
    or "BGR"), pixel values as they are. The ImageType's scale and bias are not applied here: coremltools writes
    them into the program as mul / add ops, which the evaluator runs."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise Edge3dfaError(f"an image input takes an RGB uint8 image [H,W,3], got {a.dtype} {list(a.shape)}")
    if color_layout not in ("RGB", "BGR"):
        raise Edge3dfaError(f"MIL evaluator: image color layout {color_layout!r} is not modelled (RGB, BGR)")
    planes = a.transpose(2, 0, 1)
    return np.ascontiguousarray((planes if color_layout == "RGB" else planes[::-1])[None].astype(np.float32))


# ---------------------------------------------------------------- helpers


def _nptype(var: Any) -> np.dtype | None:
    """numpy dtype of a MIL tensor/scalar var (None for strings, lists and sub-byte types kept as loaded)."""
    from coremltools.converters.mil.mil import types

    dt = var.dtype
    if types.is_tensor(dt):
        dt = dt.get_primitive()
    if dt == types.fp16:
        return np.dtype(np.float16)
    if dt == types.fp32:
        return np.dtype(np.float32)
    if dt == types.fp64:
        return np.dtype(np.float64)
    if dt == types.int32:
        return np.dtype(np.int32)
    if dt == types.int16:
        return np.dtype(np.int16)
    if dt == types.int8:
        return np.dtype(np.int8)
    if dt == types.uint8:
        return np.dtype(np.uint8)
    if dt == types.bool:
        return np.dtype(bool)
    return None


def _pads(pad_type: str, pad: np.ndarray | None, size: tuple[int, ...], kernel: tuple[int, ...],
          strides: tuple[int, ...], dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for MIL's pad_type valid / custom / same / same_lower."""
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        p = [int(v) for v in (pad if pad is not None else [0] * 2 * len(size))]
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(size))]
    if pad_type in ("same", "same_lower"):
        out = []
        for n, k, s, d in zip(size, kernel, strides, dilations):
            keff = (k - 1) * d + 1
            total = max(0, (-(-n // s) - 1) * s + keff - n)
            small = total // 2
            out.append((small, total - small) if pad_type == "same" else (total - small, small))
        return out
    raise Edge3dfaError(f"MIL evaluator: unknown pad_type {pad_type!r}")


def _ints(v: Any, n: int, default: int = 1) -> tuple[int, ...]:
    return tuple([default] * n if v is None else (int(i) for i in np.asarray(v).reshape(-1)))


def _along(param: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A scalar or a vector along ``axis``, shaped to broadcast against a tensor of ``rank``."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[int(axis) % rank] = param.size
    return param.reshape(shape)


def _window(x: np.ndarray, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, ...],
            dilations: tuple[int, ...]) -> np.ndarray:
    """The strided view of padded x [N,C,H,W] that kernel tap (i, j) sees for every output pixel."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, strides, dilations
    return x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def _conv2d(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, strides: tuple[int, ...],
            pads: list[tuple[int, int]], dilations: tuple[int, ...], groups: int) -> np.ndarray:
    """Grouped 2-D convolution (cross-correlation, as every framework): im2col + one matmul per group;
    depthwise (one input channel per group) as a sum of shifted products."""
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise Edge3dfaError(f"MIL evaluator: conv weight {w.shape} does not fit input {x.shape} with groups={groups}")
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    ho = (x.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    wo = (x.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    og = o // groups
    if cg == 1:
        xr = np.repeat(x, og, axis=1) if og > 1 else x  # output channel k reads input channel k // og
        out = np.zeros((n, o, ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                out += _window(xr, i, j, (ho, wo), strides, dilations) * w[None, :, 0, i, j, None, None]
    else:
        cols = np.stack([_window(x, i, j, (ho, wo), strides, dilations) for i in range(kh) for j in range(kw)],
                        axis=2)  # [N, C, kh*kw, Ho, Wo]
        cols = cols.reshape(n, groups, cg * kh * kw, ho * wo).transpose(1, 2, 0, 3).reshape(groups, cg * kh * kw, -1)
        out = np.matmul(w.reshape(groups, og, cg * kh * kw), cols)  # [G, og, N*Ho*Wo]
        out = out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def _pool(x: np.ndarray, a: dict[str, Any], kind: str) -> np.ndarray:
    if x.ndim != 4:
        raise Edge3dfaError(f"MIL evaluator: {kind}_pool is implemented for 2-D pooling only, got rank {x.ndim}")
    k = _ints(a["kernel_sizes"], 2)
    s = _ints(a.get("strides"), 2)
    pads = _pads(str(a.get("pad_type", "valid")), a.get("pad"), x.shape[2:], k, s, (1, 1))
    if bool(a.get("ceil_mode", False)):
        for d in range(2):  # MIL's ceil rule; an extra window that only overhangs padding is dropped
            size = x.shape[2 + d] + sum(pads[d])
            out = (size - k[d] + s[d] - 1) // s[d] + 1
            if (out - 1) * s[d] >= x.shape[2 + d] + pads[d][0] and sum(pads[d]) > 0:
                out -= 1
            extra = (out - 1) * s[d] + k[d] - size
            if extra > 0:
                if kind == "avg":
                    raise Edge3dfaError("MIL evaluator: avg_pool with ceil_mode overhang is not modelled")
                pads[d] = (pads[d][0], pads[d][1] + extra)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), *pads), constant_values=fill)
    ho, wo = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    taps = [_window(xp, i, j, (ho, wo), s, (1, 1)) for i in range(k[0]) for j in range(k[1])]
    if kind == "max":
        return np.maximum.reduce(taps)
    total = np.add.reduce(taps)
    if bool(a.get("exclude_padding_from_average", False)):
        ones = np.pad(np.ones((1, 1) + x.shape[2:], np.float32), ((0, 0), (0, 0), *pads))
        count = np.add.reduce([_window(ones, i, j, (ho, wo), s, (1, 1)) for i in range(k[0]) for j in range(k[1])])
        return total / count
    return total / np.float32(k[0] * k[1])


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """iOS16 LUT indices: ``nbits``-bit fields packed LSB first, one byte after the other."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=1)


def _lut_to_dense(a: dict[str, Any]) -> np.ndarray:
    lut = np.asarray(a["lut"])
    if "shape" in a:  # iOS16: 1-D lut, bit-packed uint8 indices, explicit output shape
        shape = tuple(int(v) for v in a["shape"])
        nbits = int(np.log2(lut.size))
        return lut[_unpack_bits(a["indices"], nbits, int(np.prod(shape)))].reshape(shape)
    indices = np.asarray(a["indices"]).astype(np.int64)  # iOS18: unpacked uintN, lut [..groups.., 2^n, vector]
    rank = indices.ndim
    groups = [np.arange(n).reshape([-1 if d == i else 1 for d in range(rank)]) // (n // lut.shape[i])
              for i, n in enumerate(indices.shape)]
    values = lut[(*groups, indices)]  # [*indices.shape, vector_size]
    if lut.shape[-1] == 1:
        return values[..., 0]
    axis = int(a["vector_axis"]) % rank
    values = np.moveaxis(values, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= lut.shape[-1]
    return values.reshape(shape)


def _blockwise_shift_scale(a: dict[str, Any]) -> np.ndarray:
    data, scale = np.asarray(a["data"]), np.asarray(a["scale"])
    offset = a.get("offset")
    reps = [d // s for d, s in zip(data.shape, scale.shape)]

    def expand(p: np.ndarray) -> np.ndarray:
        for axis, r in enumerate(reps):
            p = np.repeat(p, r, axis=axis) if r > 1 else p
        return p

    data = data.astype(np.float32)
    if offset is not None:
        data = data - expand(np.asarray(offset, np.float32))
    return expand(scale.astype(np.float32)) * data


def _quantize(a: dict[str, Any], out_dtype: np.dtype) -> np.ndarray:
    x = np.asarray(a["input"], np.float32)
    axis = a.get("axis")
    q = np.round(x / _along(np.asarray(a["scale"], np.float32), x.ndim, axis))  # numpy rounds half to even
    if a.get("zero_point") is not None:
        q = q + _along(np.asarray(a["zero_point"], np.float32), x.ndim, axis)
    info = np.iinfo(out_dtype)
    return np.clip(q, info.min, info.max)


def _dequantize(a: dict[str, Any], data_key: str) -> np.ndarray:
    q = np.asarray(a[data_key]).astype(np.float32)
    axis = a.get("axis")
    if a.get("zero_point") is not None:
        q = q - _along(np.asarray(a["zero_point"], np.float32), q.ndim, axis)
    return _along(np.asarray(a["scale"], np.float32), q.ndim, axis) * q


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]  # 0 inherits (same-rank reshape)
    return x.reshape(shape)


def _concat(values: list[np.ndarray], axis: int, interleave: bool) -> np.ndarray:
    if not interleave:
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce_axes(a: dict[str, Any]) -> tuple[int, ...] | None:
    axes = a.get("axes")
    return None if axes is None else tuple(int(v) for v in np.asarray(axes).reshape(-1))


def _linear(a: dict[str, Any]) -> np.ndarray:
    out = np.matmul(a["x"], np.asarray(a["weight"]).T)
    return out if a.get("bias") is None else out + a["bias"]


def _matmul(a: dict[str, Any]) -> np.ndarray:
    x, y = a["x"], a["y"]
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv(a: dict[str, Any]) -> np.ndarray:
    x, w = a["x"], np.asarray(a["weight"], np.float32)
    if x.ndim != 4:
        raise Edge3dfaError(f"MIL evaluator: conv is implemented for 2-D convolution only, got rank {x.ndim}")
    k = w.shape[2:]
    s, d = _ints(a.get("strides"), 2), _ints(a.get("dilations"), 2)
    pads = _pads(str(a.get("pad_type", "valid")), a.get("pad"), x.shape[2:], k, s, d)
    return _conv2d(x, w, a.get("bias"), s, pads, d, int(a.get("groups", 1)))


def _batch_norm(a: dict[str, Any]) -> np.ndarray:
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - a["mean"].reshape(shape)) / np.sqrt(a["variance"].reshape(shape) + np.float32(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * a["gamma"].reshape(shape)
    return y if a.get("beta") is None else y + a["beta"].reshape(shape)


def _squeeze(a: dict[str, Any]) -> np.ndarray:
    axes = _reduce_axes(a)
    return np.squeeze(a["x"]) if axes is None else np.squeeze(a["x"], axis=axes)


def _slice_by_index(a: dict[str, Any]) -> np.ndarray:
    """numpy-style ``x[begin:end:stride, ...]`` per axis; a mask entry True ignores its begin (from the start) or end
    (to the end), and ``squeeze_mask`` takes the single index ``begin`` (the axis goes), as the MIL spec says."""
    x = a["x"]
    rank = x.ndim
    begin, end = (_ints(a[k], rank) for k in ("begin", "end"))
    stride = _ints(a.get("stride"), rank)
    masks = [[bool(v) for v in (np.zeros(rank, bool) if a.get(k) is None else np.asarray(a[k]).reshape(-1))]
             for k in ("begin_mask", "end_mask", "squeeze_mask")]
    index: list[Any] = []
    for i in range(rank):
        if masks[2][i]:
            index.append(begin[i])
        else:
            index.append(slice(None if masks[0][i] else begin[i], None if masks[1][i] else end[i], stride[i]))
    return np.asarray(x[tuple(index)])


def _slice_by_size(a: dict[str, Any]) -> np.ndarray:
    """``x[begin : begin + size]`` per axis; size -1 takes the rest of the axis."""
    x = a["x"]
    begin, size = _ints(a["begin"], x.ndim), _ints(a["size"], x.ndim)
    return x[tuple(slice(b, None if n == -1 else b + n) for b, n in zip(begin, size))]


def _gather(a: dict[str, Any]) -> np.ndarray:
    if int(a.get("batch_dims", 0) or 0) != 0:
        raise Edge3dfaError("MIL evaluator: gather with batch_dims is not modelled")
    indices = np.asarray(a["indices"]).astype(np.int64)
    return np.take(a["x"], indices, axis=int(a.get("axis", 0)))


def _cast(a: dict[str, Any], op: Any) -> np.ndarray:
    """MIL cast to int32, fp16, fp32 or bool; float -> int32 truncates toward zero (numpy / C; the spec names no
    rounding mode), anything -> bool is x != 0."""
    x = np.asarray(a["x"])
    dtype = _nptype(op.outputs[0])
    if dtype == np.dtype(bool):
        return x != 0
    return x.astype(dtype)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float,
                            max_boxes: int, per_class: bool = False) -> tuple[np.ndarray, ...]:
    """MIL ``non_maximum_suppression`` (iOS15): per batch, boxes (x, y, w, h; centre and size) whose best class
    score is below ``score_threshold`` are rejected; the rest are taken greedily in descending order of score, each
    suppressing every remaining box with IoU > ``iou_threshold``, until ``max_boxes``. Returns boxes [n, max, 4],
    scores [n, max, K], indices [n, max] and the count [n]. Rows past the count: the spec says "padded" without a
    value; here boxes and scores 0 and indices -1 (a graph must read only the first ``count`` rows). Score ties keep
    the lower index first (a stable sort; the spec names no tie rule)."""
    if per_class:
        raise Edge3dfaError("MIL evaluator: non_maximum_suppression with per_class_suppression is not modelled")
    boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
    n, _, k = scores.shape
    out_boxes = np.zeros((n, max_boxes, 4), np.float32)
    out_scores = np.zeros((n, max_boxes, k), np.float32)
    out_idx = np.full((n, max_boxes), -1, np.int32)
    count = np.zeros(n, np.int32)
    for b in range(n):
        best = scores[b].max(axis=1)
        order = [i for i in np.argsort(-best, kind="stable") if best[i] >= score_threshold]
        half = boxes[b, :, 2:] / 2
        corners = np.concatenate([boxes[b, :, :2] - half, boxes[b, :, :2] + half], axis=1).astype(np.float64)
        area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        kept: list[int] = []
        while order and len(kept) < max_boxes:
            i, rest = order[0], np.asarray(order[1:], np.int64)
            kept.append(i)
            wh = np.clip(np.minimum(corners[i, 2:], corners[rest, 2:]) - np.maximum(corners[i, :2], corners[rest, :2]),
                         0, None)
            inter = wh[:, 0] * wh[:, 1]
            iou = inter / np.maximum(area[i] + area[rest] - inter, np.finfo(np.float64).tiny)
            order = [int(j) for j in rest[iou <= iou_threshold]]
        count[b] = len(kept)
        out_boxes[b, :len(kept)] = boxes[b, kept]
        out_scores[b, :len(kept)] = scores[b, kept]
        out_idx[b, :len(kept)] = kept
    return out_boxes, out_scores, out_idx, count


def _nms(a: dict[str, Any]) -> tuple[np.ndarray, ...]:
    return non_maximum_suppression(a["boxes"], a["scores"], float(a["iou_threshold"]), float(a["score_threshold"]),
                                   int(a["max_boxes"]), bool(a.get("per_class_suppression", False)))


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[[dict[str, Any], Any], np.ndarray]:
    return lambda a, op: fn(a["x"], axis=_reduce_axes(a), keepdims=bool(a.get("keep_dims", False)))


def _l2_norm(x: np.ndarray, axis: tuple[int, ...] | None, keepdims: bool) -> np.ndarray:
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


#: op type -> fn(args, op); args are the op's inputs as numpy values (fp16 widened to fp32 for arithmetic)
OPS: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "const": lambda a, op: op.outputs[0].val,
    "constexpr_affine_dequantize": lambda a, op: _dequantize(a, "quantized_data"),
    "constexpr_blockwise_shift_scale": lambda a, op: _blockwise_shift_scale(a),
    "constexpr_lut_to_dense": lambda a, op: _lut_to_dense(a),
    "constexpr_cast": lambda a, op: np.asarray(a["source_val"]),
    "quantize": lambda a, op: _quantize(a, _nptype(op.outputs[0])),
    "dequantize": lambda a, op: _dequantize(a, "input"),
    "cast": _cast,
    "conv": lambda a, op: _conv(a),
    "batch_norm": lambda a, op: _batch_norm(a),
    "linear": lambda a, op: _linear(a),
    "matmul": lambda a, op: _matmul(a),
    "max_pool": lambda a, op: _pool(a["x"], a, "max"),
    "avg_pool": lambda a, op: _pool(a["x"], a, "avg"),
    "reduce_mean": _reduce(np.mean),
    "reduce_min": _reduce(np.min),
    "reduce_max": _reduce(np.max),
    "reduce_sum": _reduce(np.sum),
    "reduce_l2_norm": _reduce(_l2_norm),
    "relu": lambda a, op: np.maximum(a["x"], 0),
    "relu6": lambda a, op: np.clip(a["x"], 0, 6),
    "clip": lambda a, op: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"]),
    "sigmoid": lambda a, op: 1 / (1 + np.exp(-a["x"])),
    "sigmoid_hard": lambda a, op: np.minimum(np.maximum(a.get("alpha", 0.2) * a["x"] + a.get("beta", 0.5), 0), 1),
    "add": lambda a, op: a["x"] + a["y"],
    "sub": lambda a, op: a["x"] - a["y"],
    "mul": lambda a, op: a["x"] * a["y"],
    "real_div": lambda a, op: a["x"] / a["y"],
    "maximum": lambda a, op: np.maximum(a["x"], a["y"]),
    "minimum": lambda a, op: np.minimum(a["x"], a["y"]),
    "reshape": lambda a, op: _reshape(a["x"], a["shape"]),
    "transpose": lambda a, op: np.transpose(a["x"], [int(v) for v in a["perm"]]),
    "squeeze": lambda a, op: _squeeze(a),
    "expand_dims": lambda a, op: np.expand_dims(a["x"], _reduce_axes(a)),
    "concat": lambda a, op: _concat(a["values"], int(a["axis"]), bool(a.get("interleave", False))),
    "tile": lambda a, op: np.tile(a["x"], [int(v) for v in a["reps"]]),
    "softmax": lambda a, op: _softmax(a["x"], int(a.get("axis", -1))),
    "exp": lambda a, op: np.exp(a["x"]),
    "sqrt": lambda a, op: np.sqrt(a["x"]),
    "abs": lambda a, op: np.abs(a["x"]),
    "atan": lambda a, op: np.arctan(a["x"]),
    "equal": lambda a, op: a["x"] == a["y"],
    "not_equal": lambda a, op: a["x"] != a["y"],
    "greater": lambda a, op: a["x"] > a["y"],
    "greater_equal": lambda a, op: a["x"] >= a["y"],
    "less": lambda a, op: a["x"] < a["y"],
    "less_equal": lambda a, op: a["x"] <= a["y"],
    "logical_and": lambda a, op: np.logical_and(a["x"], a["y"]),
    "logical_or": lambda a, op: np.logical_or(a["x"], a["y"]),
    "logical_not": lambda a, op: np.logical_not(a["x"]),
    "select": lambda a, op: np.where(a["cond"], a["a"], a["b"]),
    "fill_like": lambda a, op: np.full(np.shape(a["ref_tensor"]), a.get("value", 0.0)),
    "reverse": lambda a, op: np.flip(a["x"], axis=_reduce_axes(a)),
    "stack": lambda a, op: np.stack(a["values"], axis=int(a["axis"])),
    "slice_by_index": lambda a, op: _slice_by_index(a),
    "slice_by_size": lambda a, op: _slice_by_size(a),
    "gather": lambda a, op: _gather(a),
    "non_maximum_suppression": lambda a, op: _nms(a),
}


def _widen(v: Any) -> Any:
    """fp16 values take part in arithmetic as float32 (exact); their result is rounded back per the program."""
    if isinstance(v, np.ndarray) and v.dtype == np.float16:
        return v.astype(np.float32)
    if isinstance(v, np.float16):
        return np.float32(v)
    return v


class MILEvaluator:
    """Runs the ``main`` function of a MIL program on numpy inputs; see the module docstring for the scope."""

    def __init__(self, program: Any, name: str = "MIL program", function: str = "main"):
        self.name = name
        if function not in program.functions:
            raise Edge3dfaError(f"{name}: no function {function!r} (has {', '.join(program.functions)})")
        self.function = program.functions[function]
        self.ops = list(self.function.operations)
        unknown = sorted({op.op_type for op in self.ops if op.op_type not in OPS or op.blocks})
        if unknown:
            raise Edge3dfaError(f"{name}: the numpy MIL evaluator does not implement op(s) {', '.join(unknown)}; "
                                f"it runs {len(OPS)} op types (see edge3dfa.targets.mil_eval.OPS)")
        self.input_vars = dict(self.function.inputs)
        self.output_names = [v.name for v in self.function.outputs]
        # Free every intermediate after its last reader, so big inputs (the detector) stay affordable.
        last: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for v in self._input_vars(op):
                last[v.name] = i
        self._free_after: dict[int, list[str]] = {}
        for var, i in last.items():
            if var not in self.output_names:
                self._free_after.setdefault(i, []).append(var)
        self._consts: dict[str, Any] | None = None

    @classmethod
    def from_package(cls, path: str | os.PathLike) -> MILEvaluator:
        return cls(load_program(path), name=Path(path).name)

    @staticmethod
    def _input_vars(op: Any) -> list[Any]:
        out = []
        for v in op.inputs.values():
            out.extend(v if isinstance(v, (list, tuple)) else [v])
        return out

    def input_shape(self, name: str | None = None) -> tuple[int | None, ...]:
        """Declared shape of an input; None where the dimension is flexible (a RangeDim symbol)."""
        var = self.input_vars[name or next(iter(self.input_vars))]
        return tuple(d if isinstance(d, (int, np.integer)) else None for d in var.shape)

    def _constants(self) -> dict[str, Any]:
        """const and constexpr values (weights decompressed once, fp16 ones kept widened to float32, which is
        exact), computed on first use and kept."""
        if self._consts is None:
            env: dict[str, Any] = {}
            for op in self.ops:
                if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                    self._step(op, env, None)
            self._consts = {k: _widen(v) for k, v in env.items()}
        return self._consts

    def _step(self, op: Any, env: dict[str, Any], observer: Observer | None) -> None:
        args: dict[str, Any] = {}
        for key, v in op.inputs.items():
            try:
                args[key] = [_widen(env[u.name]) for u in v] if isinstance(v, (list, tuple)) else _widen(env[v.name])
            except KeyError as e:
                raise Edge3dfaError(f"{self.name}: op {op.name} reads {e.args[0]!r} before it is defined") from None
        try:
            result = OPS[op.op_type](args, op)
        except Edge3dfaError:
            raise
        except Exception as e:  # noqa: BLE001 - numpy shape errors etc. mean the program and evaluator disagree
            raise Edge3dfaError(f"{self.name}: {op.op_type} {op.name} failed in the MIL evaluator "
                                f"({one_line(e, 160)})") from None
        results = result if isinstance(result, tuple) else (result,)
        for var, value in zip(op.outputs, results):
            dtype = _nptype(var)
            if dtype is not None:
                value = np.asarray(value).astype(dtype, copy=False)
                declared = tuple(var.shape)
                if len(declared) != value.ndim or any(isinstance(d, (int, np.integer)) and d != g
                                                      for d, g in zip(declared, value.shape)):
                    raise Edge3dfaError(f"{self.name}: {op.op_type} {op.name} gave shape {list(value.shape)}, "
                                        f"the program declares {list(declared)}")
            env[var.name] = value
            if observer is not None and op.op_type != "const" and not op.op_type.startswith("constexpr_"):
                observer(var.name, value)

    def __call__(self, feeds: dict[str, np.ndarray] | np.ndarray, observer: Observer | None = None
                 ) -> dict[str, np.ndarray]:
        """Outputs by name. ``observer(name, value)`` sees the inputs and every non-constant op output."""
        if not isinstance(feeds, dict):
            if len(self.input_vars) != 1:
                raise Edge3dfaError(f"{self.name}: has inputs {', '.join(self.input_vars)}; pass them by name")
            feeds = {next(iter(self.input_vars)): feeds}
        env = dict(self._constants())
        for name, var in self.input_vars.items():
            if name not in feeds:
                raise Edge3dfaError(f"{self.name}: input {name!r} missing")
            x = np.asarray(feeds[name]).astype(_nptype(var) or np.float32, copy=False)
            want = self.input_shape(name)
            if x.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, x.shape)):
                shown = ["?" if w is None else w for w in want]
                raise Edge3dfaError(f"{self.name}: input {name} must have shape {shown}, got {list(x.shape)}")
            env[name] = x
            if observer is not None:
                observer(name, x)
        for i, op in enumerate(self.ops):
            if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
                self._step(op, env, observer)
            for var in self._free_after.get(i, ()):
                if var not in self._consts:
                    env.pop(var, None)
        return {name: env[name] for name in self.output_names}
