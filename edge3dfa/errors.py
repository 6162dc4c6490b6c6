"""The exit-code contract of every ``edge3dfa`` command, and the exceptions that carry it.

====  =========================================================================================
0     ok (for ``validate``/``export``: verdict PASSED)
1     a gate failed or a budget was not met (verdict FAILED or NOT VERIFIED)
2     user error: bad input, option, missing or corrupt file (``Edge3dfaError``), full disk,
      permission denied
3     internal error: a bug; one line on stderr plus the path of a log with the traceback
130   interrupted (Ctrl-C, SIGINT); 143 terminated (SIGTERM); 141 output pipe closed
====  =========================================================================================

``Interrupted`` derives from ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` blocks do not
swallow it, while ``finally`` blocks and context managers (temp folders, atomic writes) still clean up.
"""

from __future__ import annotations

import signal
import sys

OK, GATE_FAILED, USER_ERROR, INTERNAL_ERROR = 0, 1, 2, 3


class Edge3dfaError(Exception):
    """Bad input or missing data: a message a person can act on, never a traceback (exit 2)."""

    exit_code = USER_ERROR


class Interrupted(BaseException):
    """Raised in the main thread when the process receives SIGTERM (or SIGHUP), like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_interrupted(signum: int, _frame: object) -> None:
    """Signal handler: turn SIGTERM/SIGHUP into ``Interrupted`` so cleanup code runs as for Ctrl-C."""
    raise Interrupted(signum)


def handle_termination() -> None:
    """Route SIGTERM and SIGHUP to ``raise_interrupted`` (main thread only; a no-op elsewhere).

    A signal the parent set to be ignored stays ignored (``nohup`` ignores SIGHUP, a shell's ``cmd &`` SIGINT):
    the person asked for the command to outlive it. Python itself leaves an ignored SIGINT alone."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
            signal.signal(getattr(signal, name), raise_interrupted)


INTERRUPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class DeferredInterrupts:
    """``with DeferredInterrupts() as d:``: SIGINT/SIGTERM/SIGHUP are recorded instead of acting mid-way.

    On leaving the block the first recorded signal is delivered as it would have been (KeyboardInterrupt,
    ``Interrupted``, or the default action), so steps that must not be split (the renames of a pair, one video
    frame and its JSON line) finish first. A loop polls ``d.requested`` to stop at a safe point; while ``hold`` is
    False a *second* signal acts at once (a stuck read can still be stopped). ``d.consume()`` drops the recorded
    signal (a camera run ends normally on Ctrl-C). Outside the main thread this is a no-op: signals go there.
    """

    def __init__(self, hold: bool = True) -> None:
        self.hold = hold
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def consume(self) -> int | None:
        signum, self.signum = self.signum, None
        return signum

    def _record(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        elif not self.hold:
            self._deliver(signum)

    def _deliver(self, signum: int) -> None:
        handler = self._old.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            import os

            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> DeferredInterrupts:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in INTERRUPT_SIGNALS:  # None: a handler not set from Python, which cannot be restored;
                if signal.getsignal(s) not in (None, signal.SIG_IGN):  # SIG_IGN: ignored, see handle_termination
                    self._old[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if self.signum is not None:
            self._deliver(self.consume())


#: the frameworks edge3dfa imports lazily whose imports run native initialisers (pybind11 / nanobind modules
#: calling back into Python); the same list as the import-linter ``forbidden`` contract in pyproject.toml
FRAMEWORKS = frozenset({"torch", "onnx", "onnxruntime", "coremltools", "ai_edge_litert", "litert_torch",
                        "ai_edge_quantizer", "tensorflow", "executorch", "tflite_runtime", "torchao"})


class FrameworkImportsDeferInterrupts:
    """``with FrameworkImportsDeferInterrupts():`` every ``import`` of a framework (``FRAMEWORKS``, any submodule)
    runs inside ``DeferredInterrupts``: a signal arriving meanwhile is delivered when the import statement ends.

    Why: a KeyboardInterrupt raised while a native module's initialiser runs Python code becomes a C++ exception
    there, and the process aborts ("terminate called after throwing an instance of 'nanobind::python_error'",
    with a traceback and no exit 130: found by ``tests/test_faults_bundles.py`` signalling a conversion as it
    began, inside ``import onnx``). Deferring at the import statement covers every lazy import at once, instead of
    each converter guarding its own. An import already done (the module in ``sys.modules``, nothing from it to
    load) passes straight through; imports nested in a guarded one are covered by it."""

    def __init__(self) -> None:
        self._original: object = None
        self._depth = 0

    def _guarded(self, name: str, globals: object = None, locals: object = None,  # noqa: A002 - __import__'s
                 fromlist: object = (), level: int = 0) -> object:
        if (self._depth or level or name.partition(".")[0] not in FRAMEWORKS
                or (name in sys.modules and not fromlist)):
            return self._original(name, globals, locals, fromlist, level)
        self._depth += 1
        try:
            with DeferredInterrupts():
                return self._original(name, globals, locals, fromlist, level)
        finally:
            self._depth -= 1

    def __enter__(self) -> FrameworkImportsDeferInterrupts:
        import builtins

        self._original = builtins.__import__
        builtins.__import__ = self._guarded
        return self

    def __exit__(self, *exc: object) -> None:
        import builtins

        builtins.__import__ = self._original
