"""Where what a person should not have to read goes: tracebacks of internal errors, in a log file.

An internal error (a bug) is one line on stderr plus the path of a log holding the traceback, the command line
and the versions, so a report can be filed without rerunning. Logs go to the user cache
(``$EDGE3DFA_CACHE`` or ``~/.cache/edge3dfa``)/logs, or the system temp folder if that is not writable.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any


def one_line(e: object, limit: int = 200) -> str:
    """An exception (or any text) as one line of at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str | os.PathLike) -> str:
    """A command-line argument or file name as readable text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def log_dir() -> Path:
    cache = os.environ.get("EDGE3DFA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "edge3dfa"
    return Path(cache).expanduser() / "logs"


def write_crash_log(exc: BaseException, argv: list[str] | None = None) -> Path:
    """Write ``exc``'s traceback with the command line and versions; returns the log's path."""
    from edge3dfa import __version__

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    command = " ".join(printable(a) for a in (sys.argv[1:] if argv is None else argv))
    text = (f"edge3dfa {__version__} internal error at {datetime.now().isoformat(timespec='seconds')}\n"
            f"command: edge3dfa {command}\npython {platform.python_version()} on {platform.platform()}\n\n"
            + "".join(traceback.format_exception(exc)))
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"edge3dfa-crash-{stamp}-{os.getpid()}.log"
            path.write_text(text, errors="backslashreplace")  # argv may hold non-UTF-8 file names
            return path
        except OSError:
            continue
    return Path(os.devnull)


class ThirdPartyLog:
    """Routes what the frameworks print for their developers (Python warnings, their ``logging`` records, the
    C++ INFO/WARNING lines of TensorFlow/LiteRT and glog) to a log file, so a run shows edge3dfa's own lines.

    ``make demo`` printed 44 third-party lines among 118 (issue 19): deprecation notices, oneDNN and XNNPACK
    banners, optional torchao kernels that do not load on this CPU. None of them is actionable for a user;
    they stay one ``--verbose`` away and in the file named at the end of the run. The C++ levels are set
    through the frameworks' own environment variables, before they are imported, and only where the user has
    not set them.
    """

    ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", "GRPC_VERBOSITY": "ERROR"}

    def __init__(self) -> None:
        self.path: Path | None = log_dir() / f"edge3dfa-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        self.lines = 0
        self._file: Any = None

    def install(self) -> ThirdPartyLog:
        import logging
        import warnings

        global _INSTALLED
        for key, value in self.ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        _INSTALLED = self
        warnings.showwarning = self._show_warning
        handler = logging.StreamHandler(self)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)  # records of every library logger that propagates
        return self

    def _show_warning(self, message: object, category: type, filename: str, lineno: int, file: Any = None,
                      line: str | None = None) -> None:
        self.write(f"{category.__name__} ({filename}:{lineno}): {message}\n")

    def write(self, text: str) -> None:
        if not text.strip():
            return
        try:
            if self._file is None:
                fd = self.open_for_native()
                if fd is None:  # no writable folder: the lines are dropped, and the summary says so
                    self._file, self.path = open(os.devnull, "w"), None  # noqa: SIM115
                else:
                    self._file = open(fd, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            self._file.write(text if text.endswith("\n") else text + "\n")
            self.lines += 1
        except OSError:
            self._file = self._file or open(os.devnull, "w")  # noqa: SIM115 - a log that cannot be written is dropped

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def open_for_native(self) -> int | None:
        """A descriptor appending to this log, in the cache's log folder or else the temp folder (as crash logs);
        None when neither can be written (``path`` is then None)."""
        if self.path is None:
            return None
        for folder in (self.path.parent, Path(tempfile.gettempdir())):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(folder / self.path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError:
                continue
            self.path = folder / self.path.name
            return fd
        self.path = None
        return None

    def uninstall(self) -> None:
        """Native output is no longer routed here (the command is over; tests run several in one process)."""
        global _INSTALLED
        if _INSTALLED is self:
            _INSTALLED = None

    def summary(self) -> str | None:
        """One line naming the file, when anything went there."""
        self.flush()
        if not self.lines:
            return None
        if self.path is None:
            return (f"{self.lines} third-party warning(s) dropped: no writable log folder ({printable(log_dir())} "
                    f"or {printable(tempfile.gettempdir())}); --verbose shows them")
        return f"{self.lines} third-party warning(s) in {printable(self.path)} (--verbose shows them)"


_INSTALLED: ThirdPartyLog | None = None


@contextmanager
def native_output() -> Iterator[None]:
    """What C/C++ code writes to file descriptor 2 inside goes to the installed ``ThirdPartyLog``'s file.

    TensorFlow's absl and oneDNN banners (on importing it) and LiteRT's "Created TensorFlow Lite XNNPACK
    delegate" (on the first interpreter) bypass Python and ignore ``TF_CPP_MIN_LOG_LEVEL``, so ``make demo``
    still printed them. Wrap only the calls that print them (an import, an interpreter's creation): Python's own
    stderr writes inside go to the file too. Nothing changes with ``--verbose`` (no log installed) or when the
    file cannot be opened.
    """
    log = _INSTALLED
    target = log.open_for_native() if log is not None else None
    if target is None:
        yield
        return
    log.flush()
    before, lines = os.fstat(target).st_size, log.lines
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        log.flush()  # the Python warnings written inside are counted once
        with open(log.path, "rb") as f:
            f.seek(before)
            log.lines = max(log.lines, lines + f.read().count(b"\n"))
        os.close(target)
