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
    """Route SIGTERM and SIGHUP to ``raise_interrupted`` (main thread only; a no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), raise_interrupted)
