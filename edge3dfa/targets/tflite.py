"""LiteRT / tflite-runtime target: any .tflite regressor or FaceBoxes, NHWC or NCHW, float or int8 I/O.

``ai_edge_litert`` is used where installed (``pip install edge3dfa[pi]``), ``tflite_runtime`` otherwise
(older Raspberry Pi images). Both apply XNNPACK by default; threads are explicit (``threads`` or every
CPU) so timings and Pi deployments are reproducible. The canonical call (float32 NCHW, (x-127.5)/128)
is transposed and, for int8 input, quantized here with the model's own scale and zero point; an input
outside that range is a user error, not a silent clip. A batch of N resizes the input tensor once per new
N. Imports neither torch nor numpy-incompatible extras, so it runs on a board with numpy and OpenCV only.
"""

from __future__ import annotations

import os

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import native_output, one_line
from edge3dfa.target import Target

_IDENTIFIER = b"TFL3"


def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as e:
        raise Edge3dfaError("running .tflite files needs LiteRT: pip install 'edge3dfa[pi]' "
                            "(ai-edge-litert) or tflite-runtime") from e


class _Flatbuffer:
    """Bounds-checked reads of flatbuffer tables: an IndexError when anything points outside the blob."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.n = blob, len(blob)

    def read(self, pos: int, size: int, signed: bool = False) -> int:
        if pos < 0 or pos + size > self.n:
            raise IndexError(pos)
        return int.from_bytes(self.blob[pos:pos + size], "little", signed=signed)

    def field(self, table: int, index: int) -> int | None:
        """Address of field ``index`` of ``table``; None when absent."""
        vtable = table - self.read(table, 4, signed=True)
        slot = 4 + 2 * index
        if slot + 2 > self.read(vtable, 2):
            return None
        offset = self.read(vtable + slot, 2)
        return table + offset if offset else None

    def vector(self, table: int, index: int, elem: int = 4) -> tuple[int, int]:
        """(first element address, length) of a vector field, checked to fit; (0, 0) when absent."""
        at = self.field(table, index)
        if at is None:
            return 0, 0
        start = at + self.read(at, 4)
        length = self.read(start, 4)
        self.read(start + 4, length * elem) if length else None
        return start + 4, length

    def tables(self, table: int, index: int) -> list[int]:
        """The tables of a vector-of-tables field, each with its vtable checked to be inside the blob."""
        first, length = self.vector(table, index)
        out = [first + 4 * i + self.read(first + 4 * i, 4) for i in range(length)]
        for t in out:
            self.field(t, 0)
        return out


def cut_short(blob: bytes) -> str | None:
    """Why a .tflite flatbuffer does not fit in its file, or None when every object it points to does.

    tflite-runtime, unlike LiteRT, does not verify the flatbuffer and crashes on a truncated file. This walks
    the parts of the TFLite schema the interpreter reads at load (operator codes, subgraphs with their tensors
    and operators, buffers, metadata, signatures) with bounds-checked reads; field numbers are schema.fbs's.
    """
    fb, n = _Flatbuffer(blob), len(blob)
    try:
        model = fb.read(0, 4)
        fb.tables(model, 1)  # operator_codes
        for graph in fb.tables(model, 2):  # subgraphs
            for tensor in fb.tables(graph, 0):
                fb.vector(tensor, 0)  # shape
                fb.vector(tensor, 3, 1)  # name
                for quant in ([fb.field(tensor, 4)] if fb.field(tensor, 4) else []):
                    q = quant + fb.read(quant, 4)
                    fb.vector(q, 2)  # scale
                    fb.vector(q, 3, 8)  # zero_point
            fb.vector(graph, 1), fb.vector(graph, 2)  # inputs, outputs
            for op in fb.tables(graph, 3):
                fb.vector(op, 1), fb.vector(op, 2)  # inputs, outputs
        for i, buf in enumerate(fb.tables(model, 4)):  # buffers
            fb.vector(buf, 0, 1)
            offset, size = fb.field(buf, 1), fb.field(buf, 2)
            if offset is not None and size is not None and fb.read(offset, 8) > 1 \
                    and fb.read(offset, 8) + fb.read(size, 8) > n:
                return f"buffer {i} runs past the end of the file ({n} bytes)"
        fb.tables(model, 6)  # metadata
        fb.tables(model, 7)  # signature_defs
    except IndexError:
        return f"it points past the end of the file ({n} bytes)"
    return None


def metadata_entry(blob: bytes, name: str) -> bytes | None:
    """The bytes of the model metadata entry ``name`` (schema.fbs: Model.metadata -> Buffer), or None; read with
    bounds-checked flatbuffer reads, so it needs no schema module (a Pi has none). IndexError: a corrupt file."""
    fb = _Flatbuffer(blob)
    model = fb.read(0, 4)
    buffers = fb.tables(model, 4)
    for meta in fb.tables(model, 6):
        first, length = fb.vector(meta, 0, elem=1)  # the entry's name (a string: a byte vector)
        if not length or blob[first:first + length].decode(errors="replace") != name:
            continue
        index_at = fb.field(meta, 1)
        index = fb.read(index_at, 4) if index_at is not None else 0
        if index >= len(buffers):
            raise IndexError(index)
        buf = buffers[index]
        offset_at, size_at = fb.field(buf, 1), fb.field(buf, 2)
        if offset_at is not None and size_at is not None and fb.read(offset_at, 8) > 1:
            offset, size = fb.read(offset_at, 8), fb.read(size_at, 8)
            fb.read(offset, size) if size else None
            return bytes(blob[offset:offset + size])
        first, n = fb.vector(buf, 0, 1)
        return bytes(blob[first:first + n])
    return None


def _bundle_contract(blob: bytes, name: str) -> dict | None:
    """The bundle contract in the file's ``edge3dfa.bundle`` metadata entry, or None for a params model."""
    from edge3dfa import bundle

    try:
        raw = metadata_entry(blob, bundle.METADATA_KEY)
    except IndexError:
        raise Edge3dfaError(f"{name}: truncated or corrupt TFLite file (its metadata points past the end)") from None
    return bundle.parse_contract(raw, name)


def _runtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("ai-edge-litert", "tflite-runtime"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown runtime"


class TFLiteTarget(Target):
    """A .tflite file on LiteRT's CPU interpreter with XNNPACK."""

    runtime = "litert"
    format = "tflite"
    precisions = ("fp32", "fp16", "dyn-int8", "int8")

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        interpreter_class, self.runtime = _interpreter_class()
        super().__init__(path, threads)
        if not self.path.is_file():
            raise Edge3dfaError(f"TFLite model not found: {self.path}")
        with open(self.path, "rb") as f:  # 8 bytes first: any other file is refused without reading it
            head = f.read(8)
        if len(head) < 8 or head[4:8] != _IDENTIFIER:
            raise Edge3dfaError(f"{self.path}: not a TFLite model (no {_IDENTIFIER.decode()} identifier)")
        blob = self.path.read_bytes()  # once, for the flatbuffer check and the bundle contract
        if self.runtime == "tflite_runtime":  # LiteRT verifies the flatbuffer itself
            problem = cut_short(blob)
            if problem:
                raise Edge3dfaError(f"{self.path.name}: truncated or corrupt TFLite file: {problem}")
        self.num_threads = int(threads) if threads else (os.cpu_count() or 1)
        try:
            with native_output():  # LiteRT's XNNPACK banner on the first interpreter
                self.interpreter = interpreter_class(model_path=str(self.path), num_threads=self.num_threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            why = ("it needs a newer runtime (see min_runtime in its manifest; pip install ai-edge-litert)"
                   if "find op" in str(e) else "truncated or corrupt file?")
            raise Edge3dfaError(f"{self.path.name}: {_runtime_version()} cannot load it: {why} "
                                f"({one_line(e, 120)})") from None
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1 or len(inputs[0]["shape"]) != 4:
            shapes = [list(i["shape"]) for i in inputs]
            raise Edge3dfaError(f"{self.path.name}: expected one 4-D image input, found {shapes}")
        self._input = inputs[0]
        shape = [int(v) for v in self._input["shape"]]
        if shape[3] == 3:
            self.layout, (h, w) = "NHWC", shape[1:3]
        elif shape[1] == 3:
            self.layout, (h, w) = "NCHW", shape[2:4]
        else:
            raise Edge3dfaError(f"{self.path.name}: input {shape} is not a 3-channel image (NHWC or NCHW)")
        self.input_shape = (3, h, w)
        self._batch = shape[0]
        self.bundle = _bundle_contract(blob, self.path.name)
        if self.bundle is not None:
            self._open_bundle()
            return
        self._outputs = self._ordered_outputs()
        if self._input["dtype"] not in (np.float32, np.int8, np.uint8):
            raise Edge3dfaError(f"{self.path.name}: unsupported input type {np.dtype(self._input['dtype']).name}")

    def _open_bundle(self) -> None:
        """A phone bundle: one uint8 NHWC ``image``; outputs by their signature names in the contract's order
        (``Target.run`` gives ``_run`` the uint8 image). The file is fixed at batch 1: ``_run`` loops."""
        from edge3dfa import bundle

        if self.layout != "NHWC" or self._input["dtype"] != np.uint8:
            raise Edge3dfaError(f"{self.path.name}: a bundle takes one uint8 NHWC image, the model takes "
                                f"{np.dtype(self._input['dtype']).name} {list(self._input['shape'])}")
        names = bundle.DETECTOR_OUTPUTS if self.bundle.get("kind") == "detector" else bundle.OUTPUTS
        try:
            key, sig = next(iter(self.interpreter.get_signature_list().items()))
            by_name = self.interpreter.get_signature_runner(key).get_output_details()
        except (ValueError, StopIteration) as e:
            raise Edge3dfaError(f"{self.path.name}: a bundle without a signature ({one_line(e)})") from None
        missing = [n for n in names if n not in sig["outputs"]]
        if missing:
            raise Edge3dfaError(f"{self.path.name}: the bundle's signature lacks output(s) {', '.join(missing)} "
                                f"(it has {', '.join(sig['outputs'])})")
        index = {d["index"]: d for d in self.interpreter.get_output_details()}
        self._outputs = [index[by_name[n]["index"]] for n in names]

    def input_contract(self) -> dict:
        shape = [int(v) for v in self._input["shape"]]
        if self.bundle is not None:
            return {"shape": shape, "layout": "NHWC", "dtype": "uint8", "kind": "tensor"}
        return {"shape": shape, "layout": self.layout, "dtype": np.dtype(self._input["dtype"]).name, "kind": "tensor"}

    def stored_precision(self) -> str:
        """From the tensors' types: int8/uint8/int16 anywhere = quantized, else float16 weights = fp16."""
        skip = self._input["index"] if self.bundle is not None else -1  # a bundle's uint8 image is not a weight
        types = {np.dtype(t["dtype"]) for t in self.interpreter.get_tensor_details() if t["index"] != skip}
        if types & {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)}:
            return "quantized"
        return "float16" if np.dtype(np.float16) in types else "float32"

    def _ordered_outputs(self) -> list[dict]:
        """Output details in the signature's order (output_0, output_1, ...), not tensor-index order."""
        details = self.interpreter.get_output_details()
        try:
            sig = self.interpreter.get_signature_list()
            key = next(iter(sig))
            runner = self.interpreter.get_signature_runner(key)
            by_name = runner.get_output_details()
            index = {d["index"]: d for d in details}
            ordered = [index[by_name[n]["index"]] for n in sig[key]["outputs"] if by_name[n]["index"] in index]
            if len(ordered) == len(details):
                return ordered
        except (ValueError, KeyError, StopIteration, AttributeError):
            pass
        return details

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if dtype == np.float32:
            return x
        scale, zero = self._input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(x / scale) + zero
        lo, hi = float(q.min()), float(q.max())
        if lo < info.min - 1 or hi > info.max + 1:  # one step of slack for rounding at the calibrated ends
            rng = ((info.min - zero) * scale, (info.max - zero) * scale)
            raise Edge3dfaError(f"{self.name}: input values {float(x.min()):.3g}..{float(x.max()):.3g} are outside "
                                f"the int8 input range {rng[0]:.3g}..{rng[1]:.3g} (expected (pixel - 127.5) / 128)")
        return np.clip(q, info.min, info.max).astype(dtype)

    @staticmethod
    def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
        if y.dtype == np.float32:
            return y
        scale, zero = detail["quantization"]
        return ((y.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.bundle is not None:
            return self._run_bundle(x)
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(self._quantize_input(x))
        idx = self._input["index"]
        if len(x) != self._batch:
            try:
                self.interpreter.resize_tensor_input(idx, list(x.shape))
                self.interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise Edge3dfaError(f"{self.name}: cannot run a batch of {len(x)} ({one_line(e)})") from None
            self._batch = len(x)
        self.interpreter.set_tensor(idx, x)
        self.interpreter.invoke()
        return [self._dequantize(self.interpreter.get_tensor(o["index"]), o) for o in self._outputs]

    def _run_bundle(self, images: np.ndarray) -> list[np.ndarray]:
        """uint8 images [N,H,W,3], one invoke each (the graph's reshapes are fixed at batch 1); a detector takes
        one image and returns its outputs as they are."""
        idx = self._input["index"]
        parts = []
        for image in images:
            self.interpreter.set_tensor(idx, np.ascontiguousarray(image[None]))
            self.interpreter.invoke()
            parts.append([self.interpreter.get_tensor(o["index"]).copy() for o in self._outputs])
        if self.bundle.get("kind") == "detector":
            if len(parts) != 1:
                raise Edge3dfaError(f"{self.name}: a detector bundle takes one image at a time, got {len(parts)}")
            return parts[0]
        return [np.concatenate(outs) for outs in zip(*parts)]
