"""onnxruntime target: any .onnx regressor (params or fused landmarks) or FaceBoxes, on the CPU provider.

Threads are explicit (intra-op ``threads`` or every CPU, inter-op 1) so timings and Pi deployments are
reproducible. ``optimization="disable"`` runs a QDQ int8 graph as fake-quant (Q/DQ as float ops), which
separates quantization error from int8-kernel error. Models exported with a fixed batch (e.g. third-party
batch-1 exports) are run sample by sample, so every target takes any N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line
from edge3dfa.target import Target

OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


def _ort_error(e: BaseException) -> str:
    """onnxruntime's error in one line, without its "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :" prefix."""
    text = " ".join(str(e).split())
    for marker in ("] : ", "failed:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
    return one_line(text, limit=160)


#: on one thread, large batches fall out of cache: chunks of 8 ran 7% faster per face than one batch of 64 for
#: mb05 here; with more threads one large batch is faster, so only single-threaded runs are chunked
_SINGLE_THREAD_CHUNK = 8


#: op types of quantized graphs: QDQ (Q/DequantizeLinear), dynamic (DynamicQuantizeLinear, Conv/MatMulInteger),
#: QOperator (QLinearConv ...); ONNX protobuf stores op types as plain strings, so a byte search finds them
_QUANTIZED_OPS = (b"QuantizeLinear", b"ConvInteger", b"MatMulInteger", b"QLinear")


def _bundle_contract(session: object, name: str) -> dict | None:
    """The bundle contract stored in the file's metadata (``edge3dfa.bundle``), or None for a params model."""
    from edge3dfa import bundle

    return bundle.parse_contract(session.get_modelmeta().custom_metadata_map.get(bundle.METADATA_KEY), name)


def _input_dims(node: Any) -> tuple[str, int | None, tuple[int | None, ...]]:
    """An onnxruntime input's name, its fixed batch (None when dynamic) and its other dims (None when symbolic)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in node.shape]
    return node.name, dims[0], tuple(dims[1:])


class OnnxTarget(Target):
    """An .onnx file on onnxruntime's CPU provider (or ``providers`` given)."""

    runtime = "onnxruntime"
    format = "onnx"
    precisions = ("fp32", "int8", "dyn-int8")

    def __init__(self, path: str | os.PathLike, threads: int | None = None, optimization: str = "all",
                 providers: Sequence[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise Edge3dfaError("running .onnx files needs onnxruntime: pip install onnxruntime") from e
        super().__init__(path, threads)
        if optimization not in OPTIMIZATION:
            raise Edge3dfaError(f"optimization must be one of {', '.join(OPTIMIZATION)}, got {optimization!r}")
        if not self.path.is_file():
            raise Edge3dfaError(f"ONNX model not found: {self.path}")
        self.optimization = optimization
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads) if threads else (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
        # warnings about unused initializers etc. are not the user's business, and errors arrive as exceptions
        # (reported in one line) after onnxruntime logged them too: log only what is fatal
        so.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/RuntimeError types
            raise Edge3dfaError(f"{self.path}: not a readable ONNX model ({_ort_error(e)})") from None
        inputs = self.session.get_inputs()
        self.bundle = _bundle_contract(self.session, self.path.name)
        if self.bundle is not None:
            self._open_bundle(inputs)
            return
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise Edge3dfaError(f"{self.path}: expected one float32 NCHW input, the model takes {got}")
        self.input_name, self.fixed_batch, self.input_shape = _input_dims(inputs[0])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _open_bundle(self, inputs: list) -> None:
        """A phone bundle: one uint8 NHWC image input; the canonical float input (crops, or a detector's blob
        [1,3,H,W]) is converted by ``Target.run``, so ``input_shape`` is the canonical NCHW of the native shape."""
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise Edge3dfaError(f"{self.path}: a bundle takes one uint8 NHWC image, the model takes {got}")
        self.input_name, self.fixed_batch, self.native_shape = _input_dims(inputs[0])
        self.input_shape = (self.native_shape[2], self.native_shape[0], self.native_shape[1])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def input_contract(self) -> dict:
        if self.bundle is not None:
            return {"shape": [self.fixed_batch, *self.native_shape], "layout": "NHWC", "dtype": "uint8",
                    "kind": "tensor"}
        return {**super().input_contract(), "shape": [self.fixed_batch, *self.input_shape]}

    def stored_precision(self) -> str:
        """"quantized" when the graph has quantization ops, else "float" (fp32 or fp16 weights alike)."""
        data = self.path.read_bytes()
        return "quantized" if any(op in data for op in _QUANTIZED_OPS) else "float"

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.bundle is None and self.output_names[0] in ("landmarks", "loc"):
            raise Edge3dfaError(f"{self.name}: outputs {self.output_names[0]!r}, not 62 params (a fused landmark head "
                                "or a detector); use run(), or convert without head=landmarks for the pipeline")
        return super().predict(x)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        b = self.fixed_batch
        if b is None and self.threads == 1 and len(x) > _SINGLE_THREAD_CHUNK:
            b = _SINGLE_THREAD_CHUNK  # measured: mb05 fp32 0.90 ms/face in chunks of 8 vs 0.96 as one batch of 64
            parts = [self._session_run(x[i:i + b]) for i in range(0, len(x), b)]
            return [np.concatenate(outs) for outs in zip(*parts)]
        if b is None or b == len(x):
            return self._session_run(x)
        if len(x) % b:
            raise Edge3dfaError(f"{self.name}: the model takes batches of exactly {b}, got {len(x)}")
        parts = [self._session_run(x[i:i + b]) for i in range(0, len(x), b)]
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _session_run(self, x: np.ndarray) -> list[np.ndarray]:
        """One session call; a graph that fails on a valid input (e.g. inconsistent shapes) is a bad artifact."""
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

        try:
            return self.session.run(None, {self.input_name: x})
        except (Fail, InvalidArgument, RuntimeException) as e:
            raise Edge3dfaError(f"{self.name}: the model failed on a {list(x.shape)} batch ({_ort_error(e)})") from None
