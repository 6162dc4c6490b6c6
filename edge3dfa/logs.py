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
from datetime import datetime
from pathlib import Path


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
