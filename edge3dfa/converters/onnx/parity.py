"""Parity figures only ONNX can give: a static int8 graph run as fake-quant (onnxruntime with optimisations off
runs Q/DQ as float ops, so int8 kernel error separates from quantization error), and the fused landmark head
against the numpy runtime's reconstruction. The generic figures (params, and FaceBoxes' ``detector_parity``) are
``edge3dfa.measure.parity``'s."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa import runtime

if TYPE_CHECKING:
    from edge3dfa.target import Target

_BATCH = 64


def extra_parity(path: Path, reference: Target, sets: dict[str, np.ndarray], threads: int | None) -> dict[str, Any]:
    """``<set> fake-quant`` for a quantized params model; ``<set> landmarks`` (and its fake-quant) for the fused
    landmark head; nothing for FaceBoxes or a float params model (the generic parity says it all)."""
    from edge3dfa.measure.parity import compare
    from edge3dfa.targets.onnxruntime import OnnxTarget

    output, quantized, is_bundle = _graph_facts(path)
    if output in ("loc", "conf") or is_bundle:
        return {}  # FaceBoxes, or a bundle (``measure.parity.bundle_parity`` compares it to the spec)
    variants = [("", "all")] + ([(" fake-quant", "disable")] if quantized else [])
    if output == "params":
        variants = variants[1:]  # the runtime figure is the generic parity already
    if not variants:
        return {}
    out: dict[str, Any] = {}
    for name, x in sets.items():
        ref = np.concatenate([reference.predict(x[i:i + _BATCH]) for i in range(0, len(x), _BATCH)])
        for suffix, level in variants:
            target = OnnxTarget(path, threads=threads, optimization=level)
            cand = np.concatenate([target.run(x[i:i + _BATCH])[0] for i in range(0, len(x), _BATCH)])
            key = f"{name}{suffix}" if output == "params" else f"{name} landmarks{suffix}"
            out[key] = compare(ref, cand) if output == "params" else _landmark_compare(ref, cand)
    return out


def _graph_facts(path: Path) -> tuple[str, bool, bool]:
    """The first output's name, whether the graph is static int8 (has QuantizeLinear), and whether it is a phone
    bundle (its metadata holds a contract), read from the file without opening a session."""
    import onnx

    from edge3dfa import bundle

    m = onnx.load(str(path), load_external_data=False)
    quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    is_bundle = any(p.key == bundle.METADATA_KEY for p in m.metadata_props)
    return m.graph.output[0].name, quantized, is_bundle


def _landmark_compare(ref_params: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Fused-head landmarks [N,3,68] vs the numpy runtime's from the reference params, in crop pixels."""
    roi = np.tile(np.array([[0, 0, runtime.INPUT_SIZE, runtime.INPUT_SIZE]], np.float32), (len(ref_params), 1))
    ref = runtime.to_image(runtime.reconstruct(runtime.denormalise(ref_params)), roi)
    px = np.linalg.norm(ref[:, :2].astype(np.float64) - cand[:, :2], axis=1)
    return {"landmark_max_px": float(px.max()), "landmark_mean_px": float(px.mean()),
            "z_max_abs": float(np.abs(ref[:, 2] - cand[:, 2]).max()), "n": int(len(ref_params))}
