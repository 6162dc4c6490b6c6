"""CoreML int8 (int8 weights and activations, formerly "w8a8") through ``Int8Builder``: layers named like the
model, exactly the requested layers kept float
(read back from the saved MIL program), and the --nme-budget search on CoreML on a cheap setting.

What "float" means here is read from the program, independently of the builder's bookkeeping: an int8 layer's
weighted op reads its input through a ``dequantize`` (coremltools' quantize/dequantize pair) and, above
coremltools' 2048-element weight threshold, its weight through a ``constexpr_*`` decompression op; a float
layer reads a plain tensor and a plain fp16 ``const`` weight.
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from edge3dfa.converters import convert, get_format  # noqa: E402
from edge3dfa.converters.coreml.int8 import layer_units, module_order  # noqa: E402
from edge3dfa.datasets.calibration import load_calibration  # noqa: E402
from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402
from edge3dfa.targets.mil_eval import load_program  # noqa: E402
from edge3dfa.workflows import convert as budget_convert  # noqa: E402


def module_names(model) -> list[str]:
    """Conv2d / Linear module paths in registration order (= execution order for these sequential nets)."""
    return [n.replace(".", "/") for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def weighted_ops(path) -> list:
    ops = load_program(path).functions["main"].operations
    return [op for op in ops if op.op_type in ("conv", "linear")]


def float_inputs(path) -> set[int]:
    """Program-order indices of the weighted ops whose input is not dequantized (kept float)."""
    return {i for i, op in enumerate(weighted_ops(path)) if op.inputs["x"].op.op_type != "dequantize"}


@pytest.fixture(scope="module")
def mb05():
    return Checkpoint.open("mb05")


@pytest.mark.slow
def test_builder_keeps_exactly_the_requested_layers_float(mb05, tmp_path):
    names = module_names(mb05.load())
    assert len(names) == 1 + 2 * 13 + 1  # MobileNet-V1: conv1, 13 depthwise-separable blocks, fc
    fmt = get_format("coreml")
    b = fmt.int8_builder(mb05, fmt.Options.parse({}), load_calibration(None, count=16), tmp_path)
    assert list(b.units) == names
    assert b.always_float == ["fc"] and list(b.layers) == names[:-1]  # the params layer: float by default

    b.export(tmp_path / "default.mlpackage")
    keep = ["conv1", "dw5_1/conv_sep"]  # the second after an int8 layer, whose output pair it must not read
    fields = b.export(tmp_path / "mixed.mlpackage", keep)
    assert fields["options"]["compression"]["activations"]["float_layers"] == [
        "conv1", "dw5_1/conv_sep", "fc"]
    assert fields["options"]["float_layers"] == keep
    default = float_inputs(tmp_path / "default.mlpackage")
    assert default == {names.index("fc")}
    mixed = float_inputs(tmp_path / "mixed.mlpackage")
    assert mixed == default | {names.index(k) for k in keep}
    for path, floats in ((tmp_path / "default.mlpackage", default), (tmp_path / "mixed.mlpackage", mixed)):
        for i, op in enumerate(weighted_ops(path)):
            w = op.inputs["weight"]
            if i in floats:
                assert w.op.op_type == "const", (path.name, names[i])
            elif np.prod(w.shape) > 2048:
                assert w.op.op_type.startswith("constexpr_"), (path.name, names[i])
    params = weighted_ops(tmp_path / "mixed.mlpackage")[-1]
    assert "quantize" not in {c.op_type for c in params.outputs[0].child_ops}  # the params tensor stays float
    with pytest.raises(Edge3dfaError, match="no layer"):
        b.export(tmp_path / "bad.mlpackage", ["conv_1"])


@pytest.mark.slow
def test_mbv3_layers_are_named_like_the_model():
    """MobileNet-V3 (hard-swish, squeeze-excite Linear layers, residual adds): every weighted op gets its module."""
    from edge3dfa.converters.coreml.export import convert_program, resolve
    from edge3dfa.models import build_model, randomize_
    from edge3dfa.targets.mil_eval import program_of

    model = randomize_(build_model("mbv3_05"), seed=1).eval()
    options = resolve("int8", get_format("coreml").Options.parse({}))
    units = layer_units(program_of(convert_program(model, False, options)), module_order(model))
    assert list(units) == module_names(model)


def test_int8_options_are_checked(mb05, tmp_path):
    with pytest.raises(Edge3dfaError, match="calib_method='entropy' is not one of minmax, percentile"):
        convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration={"count": 4}, verbose=False,
                options={"calib_method": "entropy"})
    with pytest.raises(Edge3dfaError, match="activations='affine' is not one of asymmetric, symmetric"):
        convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration={"count": 4}, verbose=False,
                options={"activations": "affine"})
    with pytest.raises(Edge3dfaError, match="float_output must be true or false"):
        convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration={"count": 4}, verbose=False,
                options={"float_output": "maybe"})
    with pytest.raises(Edge3dfaError, match=r"percentile=40: must be in \(50, 100\]"):
        convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration={"count": 4}, verbose=False,
                options={"percentile": 40})
    with pytest.raises(Edge3dfaError, match="int8 computes in fp16"):
        convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration={"count": 4}, verbose=False,
                options={"compute": "fp32"})
    with pytest.raises(Edge3dfaError, match="nme-budget"):  # the budget needs a calibrated precision
        budget_convert(mb05, to="coreml", precision="fp16", out_dir=tmp_path, budget=0.05, verbose=False)
    assert not list(tmp_path.rglob("*.mlpackage"))


@pytest.mark.slow
def test_budget_search_runs_on_coreml(mb05, tmp_path):
    """A real search on a cheap setting: three int8 layers (the rest kept float by option), the params layer among
    them. The ranking must put the params layer first (measured: an 8-bit params tensor is most of int8's error),
    the record must match an independent scoring of the artifact, and what it calls float must be float."""
    from edge3dfa import runtime
    from edge3dfa.datasets.heldout import load_heldout
    from edge3dfa.measure import bootstrap, metrics
    from edge3dfa.targets.coreml import CoreMLTarget, coreml_runtime_available
    from edge3dfa.targets.torch import TorchTarget
    from edge3dfa.workflows.budget import Budget

    names = module_names(mb05.load())
    int8 = ["conv1", "dw6/conv_sep", "fc"]
    held = load_heldout(48)
    calib = load_calibration(None, count=16)
    (art,) = budget_convert(mb05, to="coreml", precision="int8", out_dir=tmp_path, calibration=calib,
                            parity_count=8, verbose=False, budget=Budget.parse({"nme": 0.05, "sensitivity": True}),
                            heldout=held, threads=1,
                            options={"float_input": False, "float_output": False,
                                     "float_layers": [n for n in names if n not in int8]})
    q = art.manifest.quantization
    assert [c["name"] for c in q["candidates"]] == ["int8"]
    assert sorted(r["layer"] for r in q["sensitivity"]) == sorted(int8)
    assert q["sensitivity"][0]["layer"] == "fc", q["sensitivity"]
    if not coreml_runtime_available():
        assert q["latency_ms"] is None and q["fp32_latency_ms"] is None and "macOS" in q["latency_note"]

    def per_face(p):
        return metrics.nme_aflw21(runtime.landmarks(p, held.roi_boxes), held.gt)

    ref = per_face(TorchTarget(mb05.path, threads=1, model=mb05.load()).predict(held.inputs))
    got = per_face(CoreMLTarget(art.path, backend="mil").predict(held.inputs))
    delta = bootstrap.paired_delta(got, ref, held.yaw)  # with its interval: "met" is its upper end
    assert delta["balanced"] == pytest.approx(q["delta"]["balanced"], abs=1e-6)
    assert q["met"] == Budget(0.05).met(delta)
    floats = {names.index(n) for n in names if n not in int8 or n in q["float_layers"]}
    assert float_inputs(art.path) == floats


@pytest.mark.slow
def test_export_with_a_budget_searches_int8_and_gates_it(tmp_path):
    """`edge3dfa export --nme-budget`: the budget goes to int8 only (fp32 converts as usual), int8 is gated at the
    budget, and the report renders the search record that has no latency (CoreML is not timed off macOS)."""
    import json

    from edge3dfa.cli import main
    from edge3dfa.targets.coreml import coreml_runtime_available

    code = main(["export", "--model", "mb05", "--to", "coreml", "--precision", "fp32,int8", "--nme-budget", "0.5",
                 "--calib-count", "16", "--parity-count", "8", "--samples", "16", "--latency-runs", "0",
                 "--out", str(tmp_path)])
    report = json.loads((tmp_path / "mb05" / "report.json").read_text())
    rows = {t["precision"]: t for t in report["targets"] if t["role"] == "artifact"}
    assert code == 0 and set(rows) == {"fp32", "int8"} and all(t["status"] == "ok" for t in rows.values())
    gates = {g["gate"]: g["limit"] for g in rows["int8"]["gates"]}
    assert {k: gates[k] for k in ("max_delta_nme", "max_delta_nme_bin")} == {"max_delta_nme": 0.5,
                                                                          "max_delta_nme_bin": 1.0}
    q = json.loads((tmp_path / "mb05" / "coreml" / "mb05_int8.json").read_text())["quantization"]
    assert q["budget"]["nme"] == 0.5 and q["met"]
    if not coreml_runtime_available():
        assert q["latency_ms"] is None  # and the report with its budget table was written all the same (code 0)


@pytest.mark.slow
def test_asymmetric_activations_quantize_post_activation_tensors_finer():
    """int8 activations with a zero point spend all 256 codes on a post-ReLU tensor (min 0), where a symmetric
    scale (zero point 0) uses 128: the rounding error there halves (step rmax/255 vs rmax/127), and the output
    moves less from the float program's (same program, same evaluator: the reference)."""
    from edge3dfa.converters.coreml.export import convert_program, resolve
    from edge3dfa.converters.coreml.int8 import _quantize_activations, activation_ranges
    from edge3dfa.models.mobilenet_v3 import Hswish
    from edge3dfa.targets.mil_eval import MILEvaluator, program_of

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2, 1), Hswish(),
        torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 62)).eval()
    mlmodel = convert_program(model, False, resolve("int8", get_format("coreml").Options.parse({})))
    x = np.random.default_rng(0).standard_normal((8, 1, 3, 120, 120)).astype(np.float32)
    ranges = activation_ranges(mlmodel, x[:, 0], "minmax")
    ref = MILEvaluator(program_of(mlmodel))
    name = next(iter(ref.input_vars))
    want = np.stack([ref({name: s})[ref.output_names[0]] for s in x])
    relu_err, out_err = {}, {}
    for mode in ("symmetric", "asymmetric"):
        prog = program_of(_quantize_activations(mlmodel, ranges, (), mode))
        pairs = {q.outputs[0].child_ops[0].outputs[0].name: q.inputs["input"].name  # dequantized <- relu output
                 for q in prog.functions["main"].operations
                 if q.op_type == "quantize" and q.inputs["input"].op.op_type == "relu"}
        assert len(set(pairs.values())) == 2, pairs  # both ReLU outputs are quantized
        seen: dict[str, np.ndarray] = {}
        got = MILEvaluator(prog)
        out = np.stack([got({name: s})[got.output_names[0]] for s in x])
        got({name: x[0]}, observer=seen.__setitem__)
        relu_err[mode] = sum(float(np.abs(seen[d] - seen[r]).max()) / ranges[r]["rmax"] for d, r in pairs.items())
        out_err[mode] = float(np.sqrt(((out - want) ** 2).mean()))
    # worst rounding error over the tensor's max, summed over the two ReLU outputs: half a step each, 1/127 vs 1/255
    assert relu_err["symmetric"] == pytest.approx(2 * 0.5 / 127, rel=0.05)
    assert relu_err["asymmetric"] == pytest.approx(2 * 0.5 / 255, rel=0.05)
    assert out_err["asymmetric"] < out_err["symmetric"], out_err
