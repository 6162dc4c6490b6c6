"""The numpy MIL evaluator, op by op, against references written independently of it.

Programs are built with coremltools' MIL builder; references are PyTorch functional ops, plain numpy,
coremltools' own decompression utilities, or worked examples from the MIL op specification.
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.targets import mil_eval  # noqa: E402
from edge3dfa.targets.mil_eval import MILEvaluator  # noqa: E402

RNG = np.random.default_rng(7)


def evaluate(body, *inputs, opset=None, dtype=types.fp32):
    """Build a program ``body(x[, y])`` over ``inputs`` and return its one output from the evaluator."""
    specs = [mb.TensorSpec(shape=a.shape, dtype=dtype) for a in inputs]
    if len(inputs) == 1:
        @mb.program(input_specs=specs, opset_version=opset)
        def prog(x):
            return body(x)
    else:
        @mb.program(input_specs=specs, opset_version=opset)
        def prog(x, y):
            return body(x, y)
    ev = MILEvaluator(prog)
    return ev(dict(zip(ev.input_vars, inputs)))[ev.output_names[0]]


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def torch_conv(x, w, b, stride, pads, dilation, groups):
    """pads = (top, bottom, left, right), applied explicitly so asymmetric padding is covered."""
    t, bo, le, r = pads
    xt = F.pad(torch.from_numpy(x).double(), (le, r, t, bo))
    bt = None if b is None else torch.from_numpy(b).double()
    return F.conv2d(xt, torch.from_numpy(w).double(), bt, stride, 0, dilation, groups).numpy()


def same_pads(n, k, s, d=1, lower=False):
    """TensorFlow's SAME rule, written out here: output ceil(n/s), the odd pixel after (before for same_lower)."""
    keff = (k - 1) * d + 1
    total = max((-(-n // s) - 1) * s + keff - n, 0)
    return (total - total // 2, total // 2) if lower else (total // 2, total - total // 2)


CONV_CASES = [  # (C, O, k, stride, dilation, groups, pad_type, custom pad, bias)
    (4, 6, 3, 2, 1, 2, "custom", [1, 2, 0, 1], True),  # grouped, asymmetric pad
    (8, 8, 3, 1, 1, 8, "custom", [1, 1, 1, 1], True),  # depthwise, as MobileNet
    (4, 8, 3, 2, 1, 4, "valid", None, False),  # depthwise with channel multiplier 2
    (3, 5, 3, 1, 2, 1, "custom", [2, 2, 2, 2], True),  # dilation
    (16, 12, 1, 1, 1, 1, "valid", None, True),  # pointwise
    (3, 4, 4, 2, 1, 1, "same", None, False),  # odd total padding: the extra pixel goes after
    (3, 4, 4, 3, 1, 1, "same_lower", None, True),
    (6, 6, 7, 4, 1, 3, "custom", [3, 3, 3, 3], False),  # FaceBoxes' first conv shape
]


@pytest.mark.parametrize("c,o,k,s,d,g,pad_type,pad,bias", CONV_CASES)
def test_conv_matches_torch(c, o, k, s, d, g, pad_type, pad, bias):
    x, w = rand(2, c, 11, 13), rand(o, c // g, k, k)
    b = rand(o) if bias else None
    kw = {"bias": b} if bias else {}
    if pad_type == "custom":
        kw["pad"] = pad
        pads = pad
    elif pad_type == "valid":
        pads = [0, 0, 0, 0]
    else:
        pads = [*same_pads(11, k, s, d, pad_type == "same_lower"), *same_pads(13, k, s, d, pad_type == "same_lower")]
    got = evaluate(lambda x: mb.conv(x=x, weight=w, strides=[s, s], dilations=[d, d], groups=g, pad_type=pad_type,
                                     **kw), x, opset=ct.target.iOS16)
    np.testing.assert_allclose(got, torch_conv(x, w, b, s, pads, d, g), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("k,s,pad,exclude", [(3, 2, [1, 1, 1, 1], False), (3, 1, [1, 1, 1, 1], True),
                                             (2, 2, [0, 0, 0, 0], False)])
def test_pooling_matches_torch(k, s, pad, exclude):
    x = rand(1, 3, 9, 10)
    xt = torch.from_numpy(x)
    got_max = evaluate(lambda x: mb.max_pool(x=x, kernel_sizes=[k, k], strides=[s, s], pad_type="custom", pad=pad), x)
    got_avg = evaluate(lambda x: mb.avg_pool(x=x, kernel_sizes=[k, k], strides=[s, s], pad_type="custom", pad=pad,
                                             exclude_padding_from_average=exclude), x)
    np.testing.assert_array_equal(got_max, F.max_pool2d(xt, k, s, pad[0]).numpy())
    np.testing.assert_allclose(got_avg, F.avg_pool2d(xt, k, s, pad[0], count_include_pad=not exclude).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_activations_match_torch():
    x = np.linspace(-8, 8, 161, dtype=np.float32).reshape(1, 161)
    xt = torch.from_numpy(x)
    cases = {
        "relu": (lambda x: mb.relu(x=x), F.relu(xt)),
        "relu6": (lambda x: mb.relu6(x=x), F.relu6(xt)),
        "clip": (lambda x: mb.clip(x=x, alpha=-1.5, beta=2.0), torch.clamp(xt, -1.5, 2.0)),
        "sigmoid": (lambda x: mb.sigmoid(x=x), torch.sigmoid(xt)),
        "hardsigmoid": (lambda x: mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5), F.hardsigmoid(xt)),
        # coremltools lowers hardswish to x * sigmoid_hard(x, 1/6, 0.5)
        "hardswish": (lambda x: mb.mul(x=x, y=mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5)), F.hardswish(xt)),
        # and MobileNet-V3's Hswish (x * clamp(x + 3, 0, 6) / 6) as the converter emits it
        "hswish_clip": (lambda x: mb.mul(x=mb.mul(x=x, y=mb.clip(x=mb.add(x=x, y=3.0), alpha=0.0, beta=6.0)),
                                         y=np.float32(1 / 6)), F.hardswish(xt)),
    }
    for name, (body, ref) in cases.items():
        np.testing.assert_allclose(evaluate(body, x), ref.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_binary_ops_broadcast():
    x, y = rand(2, 3, 4), np.abs(rand(3, 1)) + 0.5
    for op, ref in (("add", x + y), ("sub", x - y), ("mul", x * y), ("real_div", x / y),
                    ("maximum", np.maximum(x, y)), ("minimum", np.minimum(x, y))):
        got = evaluate(lambda a, b, op=op: getattr(mb, op)(x=a, y=b), x, y)
        np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=op)


def test_linear_matmul_batchnorm_softmax_match_torch():
    x, w, b = rand(5, 8), rand(3, 8), rand(3)
    np.testing.assert_allclose(evaluate(lambda x: mb.linear(x=x, weight=w, bias=b), x),
                               F.linear(*map(torch.from_numpy, (x, w, b))).numpy(), rtol=1e-5, atol=1e-6)
    a, c = rand(2, 4, 3), rand(2, 5, 4)
    np.testing.assert_allclose(evaluate(lambda a, c: mb.matmul(x=a, y=c, transpose_x=True, transpose_y=True), a, c),
                               (torch.from_numpy(a).transpose(1, 2) @ torch.from_numpy(c).transpose(1, 2)).numpy(),
                               rtol=1e-5, atol=1e-6)
    x4 = rand(2, 3, 4, 5)
    mean, var, gamma, beta = rand(3), np.abs(rand(3)) + 0.1, rand(3), rand(3)
    ref = F.batch_norm(*map(torch.from_numpy, (x4, mean, var, gamma, beta)), eps=1e-3).numpy()
    got = evaluate(lambda x: mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3), x4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    logits = rand(2, 7, 3) * 10
    np.testing.assert_allclose(evaluate(lambda x: mb.softmax(x=x, axis=-1), logits),
                               torch.softmax(torch.from_numpy(logits), -1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(evaluate(lambda x: mb.reduce_mean(x=x, axes=[-2, -1], keep_dims=True), x4),
                               x4.mean(axis=(2, 3), keepdims=True), rtol=1e-6)


def test_tensor_ops():
    x = rand(2, 3, 4)
    np.testing.assert_array_equal(evaluate(lambda x: mb.reshape(x=x, shape=[0, -1, 2]), x), x.reshape(2, 6, 2))
    np.testing.assert_array_equal(evaluate(lambda x: mb.reshape(x=x, shape=[-1, 4]), x), x.reshape(6, 4))
    np.testing.assert_array_equal(evaluate(lambda x: mb.transpose(x=x, perm=[2, 0, 1]), x), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(evaluate(lambda x: mb.expand_dims(x=x, axes=[1, -1]), x), x[:, None, :, :, None])
    np.testing.assert_array_equal(evaluate(lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[0]), axes=[0]), x), x)
    np.testing.assert_array_equal(evaluate(lambda x: mb.tile(x=x, reps=[1, 2, 1]), x), np.tile(x, (1, 2, 1)))
    np.testing.assert_array_equal(evaluate(lambda a, b: mb.concat(values=[a, b], axis=1), x, x + 1),
                                  np.concatenate([x, x + 1], axis=1))
    # interleave: the spec's example, rows taken alternately from each input
    a, b = np.array([[1, 2], [3, 4]], np.float32), np.array([[5, 6], [7, 8]], np.float32)
    np.testing.assert_array_equal(evaluate(lambda a, b: mb.concat(values=[a, b], axis=0, interleave=True), a, b),
                                  [[1, 2], [5, 6], [3, 4], [7, 8]])
    np.testing.assert_array_equal(evaluate(lambda x: mb.cast(x=x, dtype="int32"), np.array([[1.7, -1.7]], np.float32)),
                                  [[1, -1]])


def test_fp16_program_rounds_every_op_output():
    """cast -> conv -> relu -> add in fp16: each op's result is rounded to float16, as CoreML stores it."""
    x, w, b = rand(1, 4, 9, 9), rand(6, 4, 3, 3).astype(np.float16), rand(6).astype(np.float16)
    shift = np.float16(0.3)

    def body(x):
        h = mb.cast(x=x, dtype="fp16")
        y = mb.relu(x=mb.conv(x=h, weight=w, bias=b, pad_type="valid"))
        return mb.cast(x=mb.add(x=y, y=shift), dtype="fp32")

    got = evaluate(body, x, opset=ct.target.iOS16)
    # reference: float16 inputs and weights, each op computed in float64 by torch, rounded to float16 after it
    xh = x.astype(np.float16).astype(np.float64)
    conv = torch_conv(xh, w.astype(np.float64), b.astype(np.float64), 1, (0, 0, 0, 0), 1, 1).astype(np.float16)
    ref = (np.maximum(conv, 0).astype(np.float64) + np.float64(shift)).astype(np.float16).astype(np.float32)
    ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(got - ref) <= ulp)  # float32 vs float64 accumulation may flip a rounding tie
    assert np.mean(got == ref) > 0.99
    # the same program in fp32 differs: the rounding is really modelled
    fp32 = evaluate(lambda x: mb.add(x=mb.relu(x=mb.conv(x=x, weight=w.astype(np.float32),
                                                         bias=b.astype(np.float32))), y=np.float32(shift)), x)
    assert np.abs(fp32 - got).max() > 1e-4
    assert np.all(got.astype(np.float16).astype(np.float32) == got)


def test_affine_dequantize_matches_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_affine_dequantize as op

    q = RNG.integers(-128, 128, (6, 4, 3, 3)).astype(np.int8)
    zp, scale = RNG.integers(-3, 3, 6).astype(np.int8), (np.abs(rand(6)) + 0.01)
    got = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_affine_dequantize(
        quantized_data=q, zero_point=zp, scale=scale, axis=0)), np.zeros(q.shape, np.float32), opset=ct.target.iOS16)
    np.testing.assert_allclose(got, op.decompress(q, zp, scale, 0), rtol=1e-6)
    assert got[2, 1, 0, 2] == pytest.approx(scale[2] * (int(q[2, 1, 0, 2]) - int(zp[2])), rel=1e-6)  # by hand


def test_lut_to_dense_ios16_spec_example_and_6bit():
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_lut_to_dense as op

    # the spec's example: n_bits=2, shape (5,), byte0 = i3 i2 i1 i0 = 01 10 11 00, byte1 = xx xx xx 11
    lut = np.array([10, 20, 30, 40], np.float32)
    packed = np.array([0b01101100, 0b00000011], np.uint8)
    got = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.uint32([5]))),
                   np.zeros(5, np.float32), opset=ct.target.iOS16)
    np.testing.assert_array_equal(got, [10, 40, 30, 20, 40])
    lut6 = rand(64)
    packed6 = RNG.integers(0, 256, 4 * 5 * 6 * 6 // 8).astype(np.uint8)  # 120 six-bit indices in 90 bytes
    shape = np.uint32([4, 5, 6])
    got = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=packed6, lut=lut6, shape=shape)),
                   np.zeros((4, 5, 6), np.float32), opset=ct.target.iOS16)
    np.testing.assert_array_equal(got, op.decompress(lut6, packed6, shape))


def test_lut_to_dense_ios18_spec_examples():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense as op

    # Case 1 of the spec: two 2-bit LUTs, one per half of the rows
    idx = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3]).reshape(6, 2).astype(types.np_uint2_dtype)
    lut = np.array([1, 5, 9, 13, 2, 10, 18, 26], np.float32).reshape(2, 1, 4, 1)
    got = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=idx, lut=lut)),
                   np.zeros((6, 2), np.float32), opset=ct.target.iOS18)
    np.testing.assert_array_equal(got, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])
    # Case 2: 1-bit vector palettization, centroids a = (0, 1, 2), b = (10, 11, 12)
    idx = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]]).astype(types.np_uint1_dtype)
    lut = np.array([0, 1, 2, 10, 11, 12], np.float32).reshape(1, 1, 1, 2, 3)
    a, b = [0, 1, 2], [10, 11, 12]
    got1 = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=idx, lut=lut, vector_axis=1)),
                    np.zeros((2, 6, 2), np.float32), opset=ct.target.iOS18)
    np.testing.assert_array_equal(got1[0, :, 0], a + b)
    np.testing.assert_array_equal(got1[0, :, 1], a + a)
    np.testing.assert_array_equal(got1[1, :, 0], b + a)
    got2 = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=idx, lut=lut, vector_axis=2)),
                    np.zeros((2, 2, 6), np.float32), opset=ct.target.iOS18)
    np.testing.assert_array_equal(got2[0], [a + a, b + a])
    np.testing.assert_array_equal(got2[1], [b + b, a + a])
    # and a 4-bit per-group case against coremltools' own numpy decompression
    idx4 = RNG.integers(0, 16, (8, 6)).astype(types.np_uint4_dtype)
    lut4 = rand(4, 1, 16, 1)
    got4 = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=idx4, lut=lut4)),
                    np.zeros((8, 6), np.float32), opset=ct.target.iOS18)
    np.testing.assert_array_equal(got4, op.decompress(idx4, lut4, None))


def test_blockwise_shift_scale_matches_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale as op

    data = RNG.integers(-128, 128, (4, 6)).astype(np.int8)
    scale, offset = np.abs(rand(2, 3)) + 0.01, RNG.integers(-4, 4, (2, 3)).astype(np.int8)
    got = evaluate(lambda x: mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)),
                   np.zeros((4, 6), np.float32), opset=ct.target.iOS18)
    np.testing.assert_allclose(got, op.decompress(data, scale, offset), rtol=1e-6)
    assert got[3, 5] == pytest.approx(scale[1, 2] * (int(data[3, 5]) - int(offset[1, 2])), rel=1e-6)  # by hand


def test_quantize_dequantize_by_hand():
    x = np.array([[-20.0, -0.25, -0.15, 0.05, 0.15, 0.25, 0.35, 20.0]], np.float32)

    def body(x):
        q = mb.quantize(input=x, scale=np.float32(0.1), output_dtype="int8")
        return mb.dequantize(input=q, scale=np.float32(0.1))

    got = evaluate(body, x, opset=ct.target.iOS17)
    # x / 0.1 = -200, -2.5, -1.5, 0.5, 1.5, 2.5, 3.5, 200 -> round half to even, clip to [-128, 127]
    np.testing.assert_allclose(got, np.array([[-128, -2, -2, 0, 2, 2, 4, 127]]) * np.float32(0.1), rtol=1e-6)
    # asymmetric uint8 per channel along axis 0
    y = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    zp, sc = np.array([10, 200], np.uint8), np.array([0.5, 0.01], np.float32)

    def body2(x):
        q = mb.quantize(input=x, zero_point=zp, scale=sc, axis=0, output_dtype="uint8")
        return mb.cast(x=mb.dequantize(input=q, zero_point=zp, scale=sc, axis=0), dtype="fp32")

    # row 0: 1/0.5 + 10 = 12 -> 1.0; row 1: 1/0.01 + 200 = 300 -> clipped 255 -> (255 - 200) * 0.01 = 0.55
    np.testing.assert_allclose(evaluate(body2, y, opset=ct.target.iOS17), [[0.0, 1.0], [0.0, 0.55]], rtol=1e-6)


def test_unknown_op_is_refused_by_name():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.erf(x=mb.relu(x=x))

    with pytest.raises(Edge3dfaError, match="does not implement op.*erf"):
        MILEvaluator(prog)


def test_wrong_shape_from_an_op_is_caught(monkeypatch):
    """The evaluator checks every op's output against the program's declared shape."""
    monkeypatch.setitem(mil_eval.OPS, "relu", lambda a, op: np.maximum(a["x"], 0)[:, :2])
    with pytest.raises(Edge3dfaError, match="relu .*gave shape \\[1, 2\\].*declares \\[1, 3\\]"):
        evaluate(lambda x: mb.relu(x=x), rand(1, 3))


def test_bad_input_shape_is_one_line_error():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3))])
    def prog(x):
        return mb.relu(x=x)

    with pytest.raises(Edge3dfaError, match=r"must have shape \[1, 3\], got \[1, 4\]"):
        MILEvaluator(prog)(np.zeros((1, 4), np.float32))


# ---------------------------------------------------------------- ops of the phone bundles (edge3dfa.bundle)


def test_unary_and_reduction_ops_of_the_bundle():
    """abs, atan, sqrt, exp, clip and the reductions, each against a plain formula (math module / explicit sums)."""
    import math

    x = np.array([[-3.0, -0.5, 0.0], [0.25, 2.0, 40.0]], np.float32)
    np.testing.assert_array_equal(evaluate(lambda x: mb.abs(x=x), x), [[3.0, 0.5, 0.0], [0.25, 2.0, 40.0]])
    np.testing.assert_allclose(evaluate(lambda x: mb.atan(x=x), x),
                               [[math.atan(v) for v in row] for row in x.tolist()], rtol=1e-6)
    np.testing.assert_allclose(evaluate(lambda x: mb.sqrt(x=x), np.abs(x)),
                               [[math.sqrt(abs(v)) for v in row] for row in x.tolist()], rtol=1e-6)
    np.testing.assert_allclose(evaluate(lambda x: mb.exp(x=x), x / 10),
                               [[math.exp(v / 10) for v in row] for row in x.tolist()], rtol=1e-6)
    np.testing.assert_array_equal(evaluate(lambda x: mb.clip(x=x, alpha=-1.0, beta=1.0), x),
                                  [[-1, -0.5, 0], [0.25, 1, 1]])
    np.testing.assert_array_equal(evaluate(lambda x: mb.reduce_min(x=x, axes=[1], keep_dims=True), x), [[-3], [0.25]])
    np.testing.assert_array_equal(evaluate(lambda x: mb.reduce_max(x=x, axes=[0]), x), [0.25, 2, 40])
    np.testing.assert_allclose(evaluate(lambda x: mb.reduce_sum(x=x, axes=[1]), x), [-3.5, 42.25])
    np.testing.assert_allclose(evaluate(lambda x: mb.reduce_l2_norm(x=x, axes=[1], keep_dims=True), x),
                               [[math.sqrt(9 + 0.25)], [math.sqrt(0.0625 + 4 + 1600)]], rtol=1e-6)


def test_comparison_logical_select_ops():
    """Comparisons give bool tensors, logical ops combine them, select picks a where true else b (hand-written)."""
    a, b = np.array([1.0, 2.0, 3.0], np.float32), np.array([2.0, 2.0, 2.0], np.float32)
    for op, want in ((mb.equal, [0, 1, 0]), (mb.not_equal, [1, 0, 1]), (mb.greater, [0, 0, 1]),
                     (mb.greater_equal, [0, 1, 1]), (mb.less, [1, 0, 0]), (mb.less_equal, [1, 1, 0])):
        got = evaluate(lambda x, y, op=op: mb.cast(x=op(x=x, y=y), dtype="fp32"), a, b)
        np.testing.assert_array_equal(got, want, err_msg=op.__name__)
    both = evaluate(lambda x, y: mb.cast(x=mb.logical_and(x=mb.greater(x=x, y=1.5), y=mb.less(x=y, y=x)),
                                         dtype="fp32"), a, b)
    np.testing.assert_array_equal(both, [0, 0, 1])
    either = evaluate(lambda x, y: mb.cast(x=mb.logical_or(x=mb.less(x=x, y=1.5), y=mb.greater(x=x, y=2.5)),
                                           dtype="fp32"), a, b)
    np.testing.assert_array_equal(either, [1, 0, 1])
    picked = evaluate(lambda x, y: mb.select(cond=mb.greater(x=x, y=y), a=x, b=mb.mul(x=y, y=-1.0)), a, b)
    np.testing.assert_array_equal(picked, [-2, -2, 3])
    filled = evaluate(lambda x: mb.fill_like(ref_tensor=x, value=1.5), np.zeros((2, 3), np.float32),
                      opset=ct.target.iOS16)
    np.testing.assert_array_equal(filled, np.full((2, 3), 1.5))


def test_reverse_stack_slice_gather():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    got = evaluate(lambda x: mb.reverse(x=x, axes=[1]), x)
    np.testing.assert_array_equal(got[:, 0], x[:, 2])  # plane 0 of the result is plane 2 of the input
    np.testing.assert_array_equal(got[:, 2], x[:, 0])
    np.testing.assert_array_equal(evaluate(lambda a, b: mb.stack(values=[a, b], axis=1), x[0], x[1]).shape, (3, 2, 4))
    assert evaluate(lambda a, b: mb.stack(values=[a, b], axis=1), x[0], x[1])[2, 1, 3] == x[1, 2, 3]
    # x[:, 1:3, ::2] written out by hand, then masks (begin_mask: from 0, end_mask: to the end) and squeeze
    got = evaluate(lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 3, 4], stride=[1, 1, 2]), x)
    np.testing.assert_array_equal(got, [[[4, 6], [8, 10]], [[16, 18], [20, 22]]])
    got = evaluate(lambda x: mb.slice_by_index(x=x, begin=[1, 2, -2], end=[0, 0, 0], begin_mask=[False, False, False],
                                               end_mask=[True, True, True], squeeze_mask=[True, False, False]), x)
    np.testing.assert_array_equal(got, [[22, 23]])
    got = evaluate(lambda x: mb.slice_by_size(x=x, begin=[0, 1, 1], size=[1, -1, 2]), x)
    np.testing.assert_array_equal(got, [[[5, 6], [9, 10]]])
    got = evaluate(lambda x: mb.gather(x=x, indices=np.array([2, 0], np.int32), axis=1), x)
    np.testing.assert_array_equal(got[0], [[8, 9, 10, 11], [0, 1, 2, 3]])
    np.testing.assert_array_equal(evaluate(lambda x: mb.cast(x=mb.cast(x=x, dtype="bool"), dtype="fp32"),
                                           np.array([0.0, -0.5, 3.0], np.float32)), [0, 1, 1])


def test_non_maximum_suppression_by_hand_and_against_the_runtime():
    """The MIL op (centre-size boxes, IoU > threshold suppressed, scores below the threshold rejected, best first):
    a worked example, then random boxes against ``edge3dfa.runtime.detect.nms`` (upstream's cpu_nms, written
    independently) with the +1 pixel convention expressed as boxes widened by one pixel."""
    from edge3dfa.runtime.detect import nms

    # box 0 (score .9) and box 1 (.8) overlap with IoU 81/119 > .5; box 2 is apart; box 3 scores under .1
    corners = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]], np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.05])
    centre = np.concatenate([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)
    b, s, idx, n = mil_eval.non_maximum_suppression(centre[None], scores[None, :, None], 0.5, 0.1, 3)
    assert n.tolist() == [2] and idx[0].tolist() == [0, 2, -1]
    np.testing.assert_array_equal(b[0, :2], centre[[0, 2]])
    _, _, idx, n = mil_eval.non_maximum_suppression(centre[None], scores[None, :, None], 0.7, 0.01, 10)
    assert idx[0, :n[0]].tolist() == [0, 1, 2, 3]  # IoU .68 <= .7 keeps box 1
    _, _, idx, n = mil_eval.non_maximum_suppression(centre[None], scores[None, :, None], 0.3, 0.01, 2)
    assert idx[0].tolist() == [0, 2]  # max_boxes

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(10, 60, (300, 2))
    dets = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (300, 1))], 1).astype(np.float32)
    want = nms(dets, 0.3)
    mil_boxes = np.concatenate([xy + wh / 2, wh + 1], 1).astype(np.float32)
    got = evaluate(lambda x, y: mb.non_maximum_suppression(boxes=x, scores=y, iou_threshold=0.3,
                                                           score_threshold=0.0, max_boxes=300)[2],
                   mil_boxes[None], dets[None, :, 4:])
    assert got[0, :len(want)].tolist() == want.tolist() and (got[0, len(want):] == -1).all()


def test_image_planes_follow_the_color_layout():
    """An RGB image [H,W,3] becomes planes [1,3,H,W] in the input's color layout, pixel values unchanged."""
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    rgb[1, 2] = (1, 2, 3)
    as_rgb, as_bgr = mil_eval.image_planes(rgb, "RGB"), mil_eval.image_planes(rgb, "BGR")
    assert as_rgb.dtype == np.float32 and as_rgb.shape == (1, 3, 2, 3)
    assert as_rgb[0, :, 0, 0].tolist() == [10, 20, 30] and as_bgr[0, :, 0, 0].tolist() == [30, 20, 10]
    assert as_rgb[0, :, 1, 2].tolist() == [1, 2, 3] and as_bgr[0, :, 1, 2].tolist() == [3, 2, 1]
    with pytest.raises(Edge3dfaError, match="RGB uint8"):
        mil_eval.image_planes(rgb.astype(np.float32), "RGB")
