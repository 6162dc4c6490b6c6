"""ExecuTorch target: a .pte regressor program on ExecuTorch's runtime, XNNPACK delegate, explicit threads.

Threads: the XNNPACK delegate runs on ExecuTorch's one process-wide thread pool, which uses every core unless
told otherwise, so timings would not be comparable with the other runtimes. Each target sets the pool to its
own ``threads`` (default: every CPU this process may use) before loading its method. The delegate keeps the
pool it was loaded with, and resetting the pool destroys that pool (``extension/threadpool/threadpool.cpp``:
``_unsafe_reset_threadpool`` replaces it), so a method loaded before a reset must not run after it: every reset
made here bumps a generation counter, and a target whose method is older than the pool loads it again (a few
ms) before running. Two targets with different thread counts therefore alternate correctly, at the price of
a reload per switch; one target per process, or equal thread counts, never reload. Code outside this module
that resets the pool is only noticed when it leaves the pool at another size.

Batches: the converter exports a dynamic batch up to a capacity (``max_batch``, read here from the program's
memory plan); larger batches run in chunks of that capacity, and a static batch-1 program runs sample by sample.

Bundles (``edge3dfa.bundle``): a program whose ``forward`` takes uint8 [B,120,120,3] images and returns landmarks,
pose and params in that order. A .pte has no tensor names, so the converter stores the contract as a constant
method ``contract`` (a JSON string, read here); a bundle program without it takes its contract from the manifest
(``open_target``) and refuses to run without one.

The runtime writes its C++ log (cpuinfo probing, pool resets, load errors) to the process's stderr. Loading is
done with that stream captured, so a normal run prints nothing and a failed load reports the runtime's own
reason in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.target import N_PARAMS, Target, usable_cpus

_MAGIC = b"ET12"  # bytes 4..8 of every .pte this runtime reads (program.cpp checks the same identifier)
_FLOAT32 = 6  # c10::ScalarType::Float, as MethodMeta reports dtypes
_UINT8 = 0  # c10::ScalarType::Byte
#: the runtime, imported once, and the pool generation: bumped whenever this module resets ExecuTorch's thread pool
_STATE: dict = {"runtime": None, "lib": None, "generation": 0}


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Import-time chatter of executorch/torchao (missing CUDA kernels, experimental-API warnings) stays out of the
    user's terminal; real errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def native_log() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 while the block runs; the lines are in the yielded
    list afterwards. Not for multi-threaded sections: the whole process's stderr is redirected meanwhile."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip())


def _runtime():  # noqa: ANN202
    """ExecuTorch's runtime and pybindings, imported once; the pool's first use (cpuinfo probing) logs, so it
    happens here, captured."""
    if _STATE["runtime"] is None:
        try:
            with quiet_imports(), native_log():
                from executorch.extension.pybindings import portable_lib
                from executorch.runtime import Runtime

                portable_lib._threadpool_get_thread_count()  # noqa: SLF001 - creates the pool
                _STATE.update(runtime=Runtime.get(), lib=portable_lib)
        except ImportError as e:
            raise Edge3dfaError(f"running .pte files needs ExecuTorch ({e.name or e}): "
                                "pip install 'edge3dfa[executorch]'") from e
    return _STATE["runtime"], _STATE["lib"]


def use_threads(n: int) -> int:
    """Size ExecuTorch's process-wide pool to ``n`` threads (if it is not already); returns the pool generation."""
    _, lib = _runtime()
    if lib._threadpool_get_thread_count() != n:  # noqa: SLF001 - the pybindings' (experimental) pool API
        with native_log():
            lib._unsafe_reset_threadpool(n)  # noqa: SLF001
        _STATE["generation"] += 1
    return _STATE["generation"]


def _reason(e: BaseException, log: list[str], limit: int = 200) -> str:
    """The runtime's own last log line (``[program.cpp:114] File size is too small ...``) or the exception."""
    text = log[-1].split("] ", 1)[-1] if log else " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(info) -> list[int]:  # noqa: ANN001
    return [int(s) for s in info.sizes()]


def _bundle_contract(program, name: str) -> dict | None:  # noqa: ANN001
    """The contract a bundle program returns from its constant method ``contract`` (JSON), or None without one."""
    from edge3dfa import bundle

    if "contract" not in program.method_names:
        return None
    with native_log() as log:
        try:
            text = program.load_method("contract").execute([])[0]
        except RuntimeError as e:
            raise Edge3dfaError(f"{name}: its 'contract' method does not run: {_reason(e, log)}") from None
    if not isinstance(text, str):
        raise Edge3dfaError(f"{name}: its 'contract' method does not return a bundle contract")
    return bundle.parse_contract(text, name)


class ExecuTorchTarget(Target):
    """A .pte program on ExecuTorch's runtime (XNNPACK delegate) with an explicit thread count.

    ``stored_precision`` stays None (cannot tell): the weights' types live inside the XNNPACK delegate's own
    flatbuffer, which ExecuTorch ships no reader for; the manifest's sha256 still ties a .pte to its precision.
    """

    runtime = "executorch"
    format = "executorch"
    precisions = ("fp32", "fp16", "int8")

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__(path, threads)
        if not self.path.is_file():
            raise Edge3dfaError(f"ExecuTorch program not found: {self.path}")
        self._data = self.path.read_bytes()
        if self._data[4:8] != _MAGIC:
            raise Edge3dfaError(f"{self.path.name}: not an ExecuTorch program (no {_MAGIC.decode()} identifier)")
        self.num_threads = int(threads) if threads else usable_cpus()
        if self.num_threads < 1:
            raise Edge3dfaError(f"{self.path.name}: threads must be >= 1, got {threads}")
        self._rt, self._lib = _runtime()
        self.program = self._load_program()
        if "forward" not in self.program.method_names:
            raise Edge3dfaError(f"{self.path.name}: the program has no 'forward' method "
                                f"(methods: {', '.join(sorted(self.program.method_names)) or 'none'})")
        meta = self.program.metadata("forward")
        #: a bundle program: uint8 NHWC images in, the contract's outputs out (``_check_bundle_io``)
        self.image_input = meta.num_inputs() == 1 and meta.input_tensor_meta(0).dtype() == _UINT8
        self.bundle = _bundle_contract(self.program, self.path.name)
        self.capacity = self._check_bundle_io(meta) if self.image_input else self._check_io(meta)
        self._method, self._generation = None, -1
        self._ready()  # a delegate that does not load (corrupt, or a backend this runtime lacks) fails at open

    def _load_program(self):  # noqa: ANN202
        with native_log() as log:
            try:
                return self._rt.load_program(self._data)
            except RuntimeError as e:
                err = e
        raise Edge3dfaError(f"{self.path.name}: truncated or corrupt ExecuTorch program: {_reason(err, log)}")

    def _check_io(self, meta) -> int:  # noqa: ANN001
        """The batch capacity; any program other than float32 [B,3,120,120] -> [B,62] is a user error."""
        if meta.num_inputs() != 1 or meta.num_outputs() < 1:
            raise Edge3dfaError(f"{self.path.name}: expected one image input and a params output, the program has "
                                f"{meta.num_inputs()} input(s) and {meta.num_outputs()} output(s)")
        inp, out = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
        shape, out_shape = _shape(inp), _shape(out)
        if len(shape) != 4 or shape[1:] != list(self.input_shape) or inp.dtype() != _FLOAT32:
            raise Edge3dfaError(f"{self.path.name}: the program takes {shape} (dtype code {inp.dtype()}), not "
                                "float32 [N,3,120,120] face crops: not a 3DDFA regressor program")
        if len(out_shape) != 2 or out_shape[1] != N_PARAMS or out.dtype() != _FLOAT32 or out_shape[0] != shape[0]:
            raise Edge3dfaError(f"{self.path.name}: the program outputs {out_shape} (dtype code {out.dtype()}), not "
                                f"float32 [N,{N_PARAMS}] params: not a 3DDFA regressor program")
        return shape[0]

    def _check_bundle_io(self, meta) -> int:  # noqa: ANN001
        """The batch capacity of a bundle program: uint8 [B,120,120,3] -> landmarks [B,68,3], pose [B,3], params
        [B,62] float32, in that order (``edge3dfa.bundle.OUTPUTS``); anything else is a user error."""
        from edge3dfa import bundle

        if self.bundle is not None and self.bundle.get("kind") != "regressor":
            raise Edge3dfaError(f"{self.path.name}: a {self.bundle.get('kind')} bundle; ExecuTorch runs regressor "
                                "bundles")
        shape = _shape(meta.input_tensor_meta(0))
        if len(shape) != 4 or shape[1:] != [*self.input_shape[1:], self.input_shape[0]]:
            raise Edge3dfaError(f"{self.path.name}: the program takes uint8 {shape}, not [N,120,120,3] face crops")
        want = [[shape[0], bundle.N_LANDMARKS, 3], [shape[0], 3], [shape[0], N_PARAMS]]
        got = [(_shape(meta.output_tensor_meta(i)), meta.output_tensor_meta(i).dtype())
               for i in range(meta.num_outputs())]
        if got != [(w, _FLOAT32) for w in want]:
            raise Edge3dfaError(f"{self.path.name}: the program outputs {[g for g, _ in got]}, not float32 "
                                f"{want} ({', '.join(bundle.OUTPUTS)}): not a 3DDFA regressor bundle")
        return shape[0]

    def input_contract(self) -> dict:
        if self.image_input:
            return {"shape": [None, *self.input_shape[1:], self.input_shape[0]], "layout": "NHWC", "dtype": "uint8",
                    "kind": "tensor"}
        return super().input_contract()

    def _ready(self):  # noqa: ANN202
        """The loaded method, (re)loaded when the pool it was loaded with has been replaced since."""
        generation = use_threads(self.num_threads)
        if self._method is None or generation != self._generation:
            if self._method is not None:  # Program caches its methods: a fresh Program gives a fresh delegate
                self._method = None  # the old delegate goes before the program it points into
                self.program = self._load_program()
            with native_log() as log:
                try:
                    self._method = self.program.load_method("forward")
                except RuntimeError as e:
                    raise Edge3dfaError(f"{self.path.name}: the ExecuTorch runtime cannot load its method "
                                        f"(missing backend or corrupt program?): {_reason(e, log)}") from None
            self._generation = generation
        return self._method

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        if self.image_input and self.bundle is None:
            raise Edge3dfaError(f"{self.name}: a bundle program without its contract (no 'contract' method); open "
                                "it beside its manifest")
        method = self._ready()
        outs = []
        for i in range(0, len(x), self.capacity):  # not captured: a redirect per call would cost more than a crop
            try:
                got = method.execute([torch.from_numpy(x[i:i + self.capacity])])
            except RuntimeError as e:
                raise Edge3dfaError(f"{self.name}: execution failed ({_reason(e, [])})") from None
            outs.append([o.numpy() for o in got] if self.image_input else [got[0].numpy()])
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*outs)]

