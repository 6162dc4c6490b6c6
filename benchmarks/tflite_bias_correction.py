"""Empirical bias correction for TFLite int8, measured on the held-out crops (an experiment: not in the converter).

Each CONV_2D / DEPTHWISE_CONV_2D of the float flatbuffer, in execution order, gets its bias lowered by the mean
per-channel error of its int8 output against the float graph's on calibration crops (where a fused ReLU lets
the output through), and the graph is quantized again before the next layer is measured, so each layer only
corrects what the layers before it left (correcting all layers from one pass over-corrects). The float
artifact is not touched; only the flatbuffer the int8 one is quantized from. Printed per model: ΔNME against
fp32 on every pool crop calibration leaves, paired against the same int8 without correction, with 95 %
intervals, and the time the correction took. Usage:

    python benchmarks/tflite_bias_correction.py [--models mb05,mbv3] [--crops 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.tools import flatbuffer_utils

from edge3dfa import assets, runtime
from edge3dfa.converters import get_format
from edge3dfa.converters.tflite.export import quiet_bars
from edge3dfa.datasets.calibration import load_calibration
from edge3dfa.datasets.heldout import heldout_for
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.predict import predict_all
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import open_target
from edge3dfa.targets.torch import TorchTarget

MODELS = {"mb05": "mb05", "mbv3": "mbv3_05_distilled", "mbv3_large": "mbv3_large_05_distilled"}
_RELU = (1, 3)  # tflite ActivationFunctionType RELU, RELU6


def _interpreter(content: bytes) -> Interpreter:
    it = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    return it


def _run(it: Interpreter, x: np.ndarray) -> None:
    it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x[None].transpose(0, 2, 3, 1)))
    it.invoke()


def quantized(builder, content: bytes) -> bytes:  # noqa: ANN001
    """``content`` quantized with the builder's recipe and ranges."""
    builder.content, original = content, builder.content
    try:
        q, _ = builder._recipe(())  # noqa: SLF001 - same recipe as the builder's export
    finally:
        builder.content = original
    with quiet_bars():
        return bytes(q.quantize(builder.qsvs, enable_progress_report=False).quantized_model)


def bias_corrected(builder, crops: np.ndarray) -> tuple[bytes, int]:  # noqa: ANN001
    """The builder's float flatbuffer with every int8 conv's bias corrected in turn (module docstring)."""
    float_it = _interpreter(builder.content)
    names = {t["index"]: t["name"] for t in float_it.get_tensor_details()}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(builder.content))
    graph = model.subgraphs[0]
    int8 = quantized(builder, builder.content)
    int8_names = {t["name"]: t for t in _interpreter(int8).get_tensor_details()}
    convs = [(i, op["outputs"][0]) for i, op in enumerate(float_it._get_ops_details())  # noqa: SLF001
             if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op["inputs"]) > 2 and op["inputs"][2] >= 0
             and int8_names.get(names[op["outputs"][0]], {}).get("dtype") == np.int8]
    reference = {i: [] for i, _ in convs}
    for x in crops:
        _run(float_it, x)
        for i, out in convs:
            reference[i].append(float_it.get_tensor(out).astype(np.float64))
    for i, out in convs:
        it = _interpreter(int8)
        tensor = {t["name"]: t for t in it.get_tensor_details()}[names[out]]
        scale, zero = tensor["quantization"]
        relu = getattr(graph.operators[i].builtinOptions, "fusedActivationFunction", 0) in _RELU
        total, count = 0.0, 0.0
        for x, ref in zip(crops, reference[i]):
            _run(it, x)
            err = (it.get_tensor(tensor["index"]).astype(np.float64) - zero) * scale - ref
            mask = ref > 0 if relu else np.ones_like(ref, bool)
            total = total + (err * mask).reshape(-1, ref.shape[-1]).sum(0)
            count = count + mask.reshape(-1, ref.shape[-1]).sum(0)
        buffer = model.buffers[graph.tensors[graph.operators[i].inputs[2]].buffer]
        bias = np.frombuffer(bytes(buffer.data), np.float32) - total / np.maximum(count, 1)
        buffer.data = np.frombuffer(bias.astype(np.float32).tobytes(), np.uint8)
        int8 = quantized(builder, bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), len(convs)


def per_face(path: Path, held) -> np.ndarray:  # noqa: ANN001
    params = predict_all(open_target(path, threads=1), held.inputs)
    return metrics.nme_aflw21(runtime.landmarks(params, held.roi_boxes), held.gt)


def compare(key: str, crops: int, work: Path) -> None:
    fmt = get_format("tflite")
    calibration = load_calibration(None, count=256)
    held = heldout_for(calibration)
    src = Checkpoint.open(MODELS[key] if key == "mb05" else assets.fetch(MODELS[key]))
    fp32_params = predict_all(TorchTarget(src.path, threads=1, model=src.load()), held.inputs)
    fp32 = metrics.nme_aflw21(runtime.landmarks(fp32_params, held.roi_boxes), held.gt)
    builder = fmt.int8_builder(src, fmt.Options.parse({}), calibration, work)
    builder.export(work / f"{key}.tflite")
    t0 = time.perf_counter()
    content, layers = bias_corrected(builder, calibration.data[:crops])
    seconds = time.perf_counter() - t0
    builder.content = content
    builder.export(work / f"{key}_bc.tflite")
    plain, corrected = per_face(work / f"{key}.tflite", held), per_face(work / f"{key}_bc.tflite", held)
    print(f"\n{key}: {len(held.inputs)} held-out crops; {layers} convs corrected on {crops} crops in {seconds:.0f} s")
    print(f"  int8 (default ranges)    vs fp32: {bootstrap.text(bootstrap.paired_delta(plain, fp32, held.yaw))}")
    print(f"  int8 + bias correction   vs fp32: {bootstrap.text(bootstrap.paired_delta(corrected, fp32, held.yaw))}")
    print(f"  bias correction, paired vs int8: {bootstrap.text(bootstrap.paired_delta(corrected, plain, held.yaw))}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mb05,mbv3")
    ap.add_argument("--crops", type=int, default=64, help="calibration crops the correction is measured on")
    args = ap.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; known: {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            compare(key, args.crops, Path(tmp))


if __name__ == "__main__":
    main()
