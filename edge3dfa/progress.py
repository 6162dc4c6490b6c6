"""One progress display over a long command (``edge3dfa export``), and where its seconds went.

An export converts and validates a dozen artifacts over minutes; its own log lines say what starts, but not how
far along the run is. ``Progress`` counts planned steps -- per artifact ``convert``, ``parity`` (in
``converters.convert_one``), ``evaluate`` and ``latency`` (in ``validation.harness``) -- and shows, on stderr,
"artifact i of n", the current step, the elapsed time and an ETA:

- on a terminal, one tqdm bar, redrawn every second so that elapsed time and ETA move during a long step; the
  per-batch bars of ``measure.predict`` nest under it (tqdm gives each open bar its own line), and log lines go
  through ``tqdm.write`` (``echo``) so that they do not tear it;
- elsewhere (CI logs, a pipe, ``TERM=dumb``, a terminal of zero columns), one plain line per step, no carriage
  returns.

The ETA is the planned steps not done, each at the mean duration of the finished steps of its kind (a
conversion predicted from conversions, an evaluation from evaluations), or of all finished steps for a kind
not seen yet; on the bar, the current step counts down from its expected time. It says "?" before any step has
finished and is rough where steps of one kind differ a lot (CoreML's numpy evaluation is many times slower than
the other runtimes', ``validation.harness.NOT_TIMED``).

The code that runs the steps does not hold the display: ``step``, ``target``, ``skip_rest`` and ``echo`` act on
the display that is active in this context (``with Progress(...)``) and do nothing (or print) when there is
none, so ``convert`` and ``validate`` called from Python show nothing new. Every second from ``started`` to the
display's close is charged to exactly one (target, step) cell -- time outside a target to ``OVERHEAD``, time in
a target outside its steps to ``OTHER`` -- so ``timings()`` sums to the wall time.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, TextIO

#: the steps an artifact goes through, in order
STEPS = ("convert", "parity", "evaluate", "latency")
#: time in a target outside its steps (opening a runtime, loading the reference for a conversion)
OTHER = "other"
#: the target charged with time outside every target (plan, data loading, between phases)
OVERHEAD = "overhead"
#: the PyTorch reference: evaluated and timed like an artifact, but not one of the n artifacts
REFERENCE = "reference"
ETA_BASIS = ("steps left x the mean duration of finished steps of the same kind (of all finished steps for a "
             "kind not seen yet)")

_ACTIVE: ContextVar[Progress | None] = ContextVar("edge3dfa_progress", default=None)


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Planned steps of ``artifacts`` (labels such as "onnx int8") and of the reference, shown on ``file``.

    ``steps``: what each artifact goes through (default ``STEPS``); ``reference_steps``: the reference's (none
    when it is not evaluated). ``interactive``: a tqdm bar (default: when ``file`` is a terminal), else plain
    lines. ``started``: the ``clock()`` time the command started, so that its set-up is counted.
    """

    def __init__(self, artifacts: Sequence[str], *, steps: Sequence[str] = STEPS,
                 reference_steps: Sequence[str] = ("evaluate", "latency"), title: str = "export",
                 file: TextIO | None = None, interactive: bool | None = None, started: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.file = file or sys.stderr
        self.interactive = _isatty(self.file) if interactive is None else interactive
        self.title, self.clock = title, clock
        self.artifacts = list(dict.fromkeys(artifacts))
        self.planned = {a: list(steps) for a in self.artifacts}
        if reference_steps:
            self.planned[REFERENCE] = list(reference_steps)
        self.done: dict[str, set[str]] = {t: set() for t in self.planned}
        self.durations: dict[str, list[float]] = {}
        self.seconds: dict[str, dict[str, float]] = {}
        self.started = clock() if started is None else started
        self._mark = self.started
        self._target, self._step = OVERHEAD, OTHER
        self._bar: Any = None
        self._token: Any = None
        self._closed: float | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._after_step: float | None = None  # ETA of the steps after the current one
        self._this_step: float | None = None  # what the current step is expected to take
        self._step_began = self.started

    # ------------------------------------------------------------ context

    def __enter__(self) -> Progress:
        self._token = _ACTIVE.set(self)
        total = sum(len(s) for s in self.planned.values())
        self._print(f"{self.title}: {len(self.artifacts)} artifact(s), {total} steps "
                    f"({', '.join(dict.fromkeys(s for v in self.planned.values() for s in v))}); ETA = {ETA_BASIS}")
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.file, unit="step", dynamic_ncols=True, leave=False, desc=self.title,
                             bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} steps{postfix}")
            self._ticker = threading.Thread(target=self._tick, name="edge3dfa-progress", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        """Redraw the bar every second: its elapsed time and ETA move during a long step, not only between steps."""
        while not self._stop.wait(1.0):
            bar = self._bar
            if bar is not None:
                bar.set_postfix_str(self._clock_line())

    def __exit__(self, *exc: object) -> None:
        self._charge()
        self._closed = self._mark
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        _ACTIVE.reset(self._token)
        if exc[0] is None:
            self._print(f"{self.title}: {self.steps_done()} steps in {_clock_text(self.elapsed())}")

    # ------------------------------------------------------------ what the work calls

    @contextmanager
    def target(self, label: str) -> Iterator[None]:
        """Time inside belongs to ``label`` (an artifact, ``REFERENCE``); one not planned is added."""
        if label not in self.planned:
            self.artifacts.append(label)
            self.planned[label], self.done[label] = list(STEPS), set()
            if self._bar is not None:
                self._bar.total += len(STEPS)
        outer = (self._target, self._step)
        self._switch(label, OTHER)
        try:
            yield
        finally:
            self._switch(*outer)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One step of the current target: announced now, counted done when it ends (even by an error)."""
        outer = self._step
        self._switch(self._target, name)
        self._announce(name)
        began = self.clock()
        try:
            yield
        finally:
            self.durations.setdefault(name, []).append(self.clock() - began)
            self._switch(self._target, outer)
            self._finish(self._target, name)

    def skip_rest(self, *names: str) -> None:
        """The current target will not run ``names`` (default: any planned step not done): the count moves on."""
        for name in names or self.planned.get(self._target, []):
            self._finish(self._target, name)

    def echo(self, msg: str) -> None:
        """A log line, printed above the bar (not through it)."""
        if self._bar is not None:
            self._bar.write(msg, file=self.file)
        else:
            self._print(msg)

    # ------------------------------------------------------------ figures

    def elapsed(self) -> float:
        """Seconds since ``started``, until the display closed."""
        return (self.clock() if self._closed is None else self._closed) - self.started

    def steps_done(self) -> int:
        return sum(len(d) for d in self.done.values())

    def expected(self, name: str) -> float | None:
        """What a step of kind ``name`` is expected to take: the mean of those finished, else of all finished
        steps (None before any has finished)."""
        ds = self.durations.get(name) or [d for v in self.durations.values() for d in v]
        return sum(ds) / len(ds) if ds else None

    def eta(self) -> float | None:
        """Seconds left for the planned steps not done, the current one included (see the module docstring)."""
        if not self.durations:
            return None
        return sum(self.expected(name) or 0.0 for target, steps in self.planned.items() for name in steps
                   if name not in self.done[target])

    def timings(self) -> dict[str, Any]:
        """Seconds per target and step, the report's ``timings`` (``validation.report``): every second since
        ``started`` is in one cell, so the rows' totals add up to ``total_s``."""
        if self._closed is None:
            self._charge()
        columns = [*dict.fromkeys(s for v in self.planned.values() for s in v), OTHER]
        rows = []
        for target, cells in self.seconds.items():
            row: dict[str, Any] = {"target": target, **{c: cells.get(c) for c in columns}}
            row["total"] = sum(cells.values())
            rows.append(row)
        return {"total_s": self.elapsed(), "steps": columns, "rows": rows,
                "note": f"wall seconds per target and step from the command's start until its report is built; "
                        f"{OVERHEAD}: outside every target (plan, data loading); {OTHER}: inside a target, "
                        "outside its steps"}

    # ------------------------------------------------------------ inside

    def _charge(self) -> None:
        now = self.clock()
        cells = self.seconds.setdefault(self._target, {})
        cells[self._step] = cells.get(self._step, 0.0) + (now - self._mark)
        self._mark = now

    def _switch(self, target: str, step: str) -> None:
        self._charge()
        self._target, self._step = target, step

    def _finish(self, target: str, name: str) -> None:
        if target in self.done and name in self.planned[target] and name not in self.done[target]:
            self.done[target].add(name)
            if self._bar is not None:
                self._bar.update(1)

    def _who(self) -> str:
        if self._target in self.artifacts:
            return f"artifact {self.artifacts.index(self._target) + 1} of {len(self.artifacts)} ({self._target})"
        return self._target

    def _announce(self, step: str) -> None:
        eta = self.eta()
        planned = step in self.planned.get(self._target, ()) and step not in self.done.get(self._target, ())
        self._this_step = (self.expected(step) or 0.0) if planned else 0.0
        self._after_step = None if eta is None else eta - self._this_step
        self._step_began = self.clock()
        if self._bar is not None:
            self._bar.set_description_str(f"{self._who()}: {step}", refresh=False)
            self._bar.set_postfix_str(self._clock_line())
        else:
            total = sum(len(s) for s in self.planned.values())
            self._print(f"{self.title} [{self.steps_done() + 1}/{total}] {self._who()}: {step}; {self._clock_line()}")

    def _clock_line(self) -> str:
        """Elapsed time and ETA now: the steps after this one, and what is left of this one's expected time."""
        left = None
        if self._after_step is not None:
            left = self._after_step + max(0.0, (self._this_step or 0.0) - (self.clock() - self._step_began))
        return f"{_clock_text(self.elapsed())} elapsed, ETA {_clock_text(left)}"

    def _print(self, msg: str) -> None:
        print(msg, file=self.file, flush=True)


def _isatty(file: TextIO) -> bool:
    """A terminal a bar can be drawn on: a tty with columns (tqdm draws nothing on a pty of size 0x0, as under
    ``script`` or some ``docker exec -t``: the display showed no step at all) and not ``TERM=dumb`` (no cursor
    movement for the nested per-batch bars). Anywhere else, plain lines."""
    try:
        if not file.isatty():
            return False
        columns = os.get_terminal_size(file.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return False
    return columns > 0 and os.environ.get("TERM", "") != "dumb"


def active() -> Progress | None:
    """The display of this context, if a command opened one."""
    return _ACTIVE.get()


def step(name: str) -> AbstractContextManager[None]:
    """``Progress.step`` of the active display; nothing without one."""
    p = _ACTIVE.get()
    return nullcontext() if p is None else p.step(name)


def target(label: str) -> AbstractContextManager[None]:
    """``Progress.target`` of the active display; nothing without one."""
    p = _ACTIVE.get()
    return nullcontext() if p is None else p.target(label)


def skip_rest(*names: str) -> None:
    """``Progress.skip_rest`` of the active display; nothing without one."""
    p = _ACTIVE.get()
    if p is not None:
        p.skip_rest(*names)


def echo(msg: str) -> None:
    """A log line on stderr, above the active bar if there is one."""
    p = _ACTIVE.get()
    if p is not None:
        p.echo(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def status(msg: str) -> None:
    """A line saying what starts now: printed only without an active display (whose step lines say it)."""
    if _ACTIVE.get() is None:
        print(msg, file=sys.stderr, flush=True)
