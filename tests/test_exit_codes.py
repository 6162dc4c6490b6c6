"""The exit-code contract (edge3dfa.errors): every outcome of the CLI is one line and a documented code.

Faults are real: a subprocess with a bug injected into a command, real signals, a closed pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable


def _cli(code: str, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``edge3dfa.cli.main(args)`` in a fresh interpreter after ``code`` (which may patch the CLI)."""
    script = f"import sys\nimport edge3dfa.cli as cli\n{code}\nsys.exit(cli.main({list(args)!r}))\n"
    return subprocess.run([PY, "-c", script], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=120, **kw)


def test_usage_error_is_one_line_exit_2():
    r = _cli("", "run", "--no-such-option")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--no-such-option" in r.stderr and "Traceback" not in r.stderr


def test_user_error_is_one_line_exit_2(tmp_path):
    r = _cli("", "run", str(tmp_path / "missing.jpg"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"edge3dfa: error: no such file or folder: {tmp_path / 'missing.jpg'}"]


def test_internal_error_exit_3_with_a_log_and_no_traceback(tmp_path):
    bug = "def boom(args):\n    return {}['no such key']\ncli.cmd_models = boom"
    r = _cli(bug, "models", env={"EDGE3DFA_CACHE": str(tmp_path)})
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("edge3dfa: internal error: KeyError")
    log = Path(lines[0].split("traceback: ", 1)[1].split(";", 1)[0])
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "boom" in text and "models" in text


def test_debug_prints_the_traceback_anywhere_on_the_line(tmp_path):
    bug = "def boom(args):\n    raise RuntimeError('bug')\ncli.cmd_models = boom"
    for argv in (("--debug", "models"), ("models", "--debug")):
        r = _cli(bug, *argv, env={"EDGE3DFA_CACHE": str(tmp_path)})
        assert r.returncode == 3
        assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: bug" in r.stderr


def test_disk_full_or_no_permission_is_a_user_error(tmp_path):
    bug = ("import errno\ndef full(args):\n    raise OSError(errno.ENOSPC, 'No space left on device', '/x/out.json')\n"
           "cli.cmd_models = full")
    r = _cli(bug, "models")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["edge3dfa: error: cannot use /x/out.json: No space left on device"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_128_plus_signal_and_run_cleanup(tmp_path, sig, code):
    marker = tmp_path / "cleaned"
    slow = (f"import time, pathlib\ndef slow(args):\n    try:\n        print('ready', flush=True)\n"
            f"        time.sleep(60)\n    finally:\n        pathlib.Path({str(marker)!r}).write_text('yes')\n"
            "cli.cmd_models = slow")
    script = f"import sys\nimport edge3dfa.cli as cli\n{slow}\nsys.exit(cli.main(['models']))\n"
    p = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code
    assert "Traceback" not in err and err.strip().startswith("edge3dfa: interrupted")
    assert marker.read_text() == "yes"


def test_closed_pipe_is_quiet():
    chatty = "def chatty(args):\n    for i in range(10**6):\n        print('x' * 100)\ncli.cmd_models = chatty"
    script = f"import sys\nimport edge3dfa.cli as cli\n{chatty}\nsys.exit(cli.main(['models']))\n"
    p = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1000)
    p.stdout.close()
    t0 = time.time()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert time.time() - t0 < 60
    assert p.returncode == 141 and "Traceback" not in err, err


def test_internal_error_log_with_a_non_utf8_argument(tmp_path):
    bug = "def boom(args):\n    raise RuntimeError('bug')\ncli.cmd_run = boom"
    script = f"import sys\nimport edge3dfa.cli as cli\n{bug}\nsys.exit(cli.main())\n"
    name = b"caf\xe9.jpg"  # a Latin-1 name: not valid UTF-8, reaches Python as a surrogate escape
    r = subprocess.run([PY, "-c", script, "run", name], capture_output=True,
                       env={**os.environ, "EDGE3DFA_CACHE": str(tmp_path)}, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 3 and "Traceback" not in err, err
    log = next((tmp_path / "logs").glob("*.log"))
    text = log.read_text()
    assert "RuntimeError: bug" in text and "caf\\xe9.jpg" in text


def test_third_party_warnings_go_to_a_log_named_at_the_end(tmp_path, monkeypatch, capsys):
    """Issue 19: the frameworks' warnings and logging records go to a file, not between edge3dfa's own lines."""
    import logging
    import warnings

    from edge3dfa.logs import ThirdPartyLog

    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    root_handlers = list(logging.getLogger().handlers)
    try:
        log = ThirdPartyLog().install()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("treespec is deprecated", FutureWarning, "/site-packages/lib/x.py", 3)
        logging.getLogger("somelib").warning("optional kernels not loaded")
        summary = log.summary()
    finally:
        log.uninstall()
        logging.getLogger().handlers[:] = root_handlers
    assert capsys.readouterr().err == ""
    text = log.path.read_text()
    assert "FutureWarning" in text and "treespec is deprecated" in text and "optional kernels not loaded" in text
    assert log.path.parent == tmp_path / "logs" and str(log.path) in summary and summary.startswith("2 ")


def test_native_stderr_of_the_frameworks_goes_to_the_log_and_edge3dfa_lines_stay(tmp_path):
    """TensorFlow's absl/oneDNN and LiteRT's XNNPACK banners are written by C++ straight to file descriptor 2
    (no Python warning to catch): inside ``native_output`` they reach the log file, and are counted in the summary;
    Python's stderr before and after is untouched; with no log installed (``--verbose``) nothing is routed."""
    script = (
        "import os, sys\n"
        "from edge3dfa.logs import ThirdPartyLog, native_output\n"
        "with native_output():\n"
        "    os.write(2, b'shown: no log installed\\n')\n"
        "log = ThirdPartyLog().install()\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "with native_output():\n"
        "    os.write(2, b'I0000 native banner\\n')\n"
        "    os.write(2, b'INFO: Created delegate\\n')\n"
        "print('after', file=sys.stderr, flush=True)\n"
        "print(log.summary(), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "EDGE3DFA_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[:3] == ["shown: no log installed", "before", "after"], lines
    assert lines[3].startswith("2 third-party warning(s) in "), lines
    text = next((tmp_path / "logs").glob("*.log")).read_text()
    assert text.splitlines() == ["I0000 native banner", "INFO: Created delegate"]


def test_verbose_is_accepted_before_and_after_the_command(tmp_path):
    for argv in (["--verbose", "models"], ["models", "--verbose"]):
        r = _cli("", *argv, env={"EDGE3DFA_CACHE": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        assert "third-party" not in r.stderr  # nothing routed, nothing announced
# ------------------------------------------------------------------------------ the ends of the process
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_full_stdout_or_stderr_is_exit_2_not_pythons_120(stream):
    """``> /dev/full`` failed only when Python flushed stdout at exit: exit 120 and 'Exception ignored'. With
    ``2> /dev/full`` even the one error line cannot be written: the exit code still says what happened."""
    table = "def table(args):\n    print('a table')\n    return 0\ncli.cmd_models = table"
    argv = ["models"] if stream == "stdout" else ["run", "missing.jpg"]
    script = f"import sys\nimport edge3dfa.cli as cli\n{table}\nsys.exit(cli.main({argv!r}))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as for a person
    with open("/dev/full", "w") as full:
        r = subprocess.run([PY, "-c", script], text=True, timeout=120, env=env, **{stream: full},
                           **{"stderr" if stream == "stdout" else "stdout": subprocess.PIPE})
    assert r.returncode == 2
    if stream == "stdout":
        assert r.stderr.splitlines() == ["edge3dfa: error: cannot write the output: No space left on device"], \
            r.stderr


def test_text_the_terminal_cannot_encode_is_escaped():
    """Under PYTHONIOENCODING=latin-1 validate --help (ΔNME in the gates text) was exit 1 with a traceback, and
    every message with Δ an internal error."""
    r = _cli("", "validate", "--help", env={"PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 0 and "\\u0394NME" in r.stdout and "Traceback" not in r.stderr, r.stderr
    bad = ("from edge3dfa.errors import Edge3dfaError\ndef bad(args):\n    raise Edge3dfaError('ΔNME 0.3 > 0.1')\n"
           "cli.cmd_models = bad")
    r = _cli(bad, "models", env={"PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 2 and r.stderr.splitlines() == ["edge3dfa: error: \\u0394NME 0.3 > 0.1"], r.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_interpreter_shuts_down_is_no_traceback(sig, code):
    """The work is done and flushed, then Python runs its exit handlers (torch's take a noticeable time): a
    Ctrl-C or SIGTERM there printed 'Exception ignored ... KeyboardInterrupt' with a traceback. The console
    script ends at once with 128+signal instead."""
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "edge3dfa"]
    assert script.value == "edge3dfa.cli:console"
    slow_exit = ("import atexit, time\nimport edge3dfa.cli as cli\ncli.cmd_models = lambda args: 0\n"
                 "atexit.register(lambda: (print('exiting', flush=True), time.sleep(30)))\ncli.console()\n")
    p = subprocess.Popen([PY, "-c", slow_exit, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "exiting"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err == "", err


@pytest.mark.parametrize("command", ["export", "convert"])
def test_a_non_utf8_out_is_a_user_error_before_any_work(tmp_path, command):
    """``--out $'out_\\xff'``: ONNX's checker cannot take the path; every conversion was an internal error (exit 1
    with crash logs from export, 3 from convert). Now one line, exit 2, nothing written."""
    out = str(tmp_path) + "/o_\udcff"  # how Python sees the bytes b"o_\xff" from a command line
    r = _cli("", command, "--to", "onnx", "--precision", "fp32", "--out", out)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"edge3dfa: error: --out {tmp_path}/o_\\xff is not a UTF-8 path, which the converters' frameworks take: "
        "choose a folder whose name is UTF-8"], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_created_is_a_user_error_before_any_work(tmp_path):
    """A folder name over 255 bytes: every conversion failed, then the report (exit 2 after the evaluation); now
    exit 2 at once, and nothing is created."""
    t0 = time.perf_counter()
    r = _cli("", "export", "--to", "onnx", "--precision", "fp32", "--out", str(tmp_path / ("e" * 300) / "o"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "a name over" in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 30 and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    r = _cli("", "convert", "--to", "onnx", "--out", str(tmp_path / "file" / "o"))
    assert r.returncode == 2 and "is not a folder" in r.stderr, r.stderr


def test_a_closed_output_pipe_is_exit_141_as_help_says():
    """``edge3dfa models | head -1``: the reader goes away, the command stops quietly with the code --help lists."""
    from edge3dfa.cli import EXIT_CODES

    p = subprocess.Popen([sys.executable, "-m", "edge3dfa.cli", "models"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=os.environ.copy())
    p.stdout.close()  # before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "141" in EXIT_CODES.split("130", 1)[1]


def test_third_party_log_falls_back_to_the_temp_folder_and_never_names_a_missing_file(tmp_path, monkeypatch):
    """A cache that cannot be written (here: a file where the folder should be): the lines go to the temp folder,
    as crash logs do, and the summary names the file that holds them; with no writable folder at all it says they
    were dropped, never a path that does not exist."""
    import tempfile

    from edge3dfa.logs import ThirdPartyLog

    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("EDGE3DFA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    log = ThirdPartyLog()
    log.write("somelib: a warning")
    log.flush()
    assert log.path.parent == tmp_path / "tmp" and log.path.read_text() == "somelib: a warning\n"
    assert str(log.path) in log.summary()

    (tmp_path / "tmp2").write_text("not a folder either")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp2"))
    dropped = ThirdPartyLog()
    dropped.write("somelib: a warning")
    assert dropped.path is None and dropped.summary().startswith("1 third-party warning(s) dropped")


def test_a_signal_during_a_framework_import_waits_for_the_import(tmp_path):
    """A signal that arrives while a framework's module initialises is delivered when the import statement ends:
    raised inside a native initialiser (nanobind) it aborted the process instead of exit 130. A stand-in framework
    package (``tflite_runtime``, one of ``FRAMEWORKS``, not installed here) signals itself mid-initialisation; the
    module must finish initialising, then the KeyboardInterrupt / Interrupted arrives at the import statement. The
    same without the guard shows the import broken off, so the test can fail."""
    pkg = tmp_path / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os, signal, time\nINIT = 'started'\n"
                                     "os.kill(os.getpid(), int(os.environ['SIG']))\ntime.sleep(0.2)\nINIT = 'done'\n")
    probe = ("import sys\nfrom edge3dfa.errors import FrameworkImportsDeferInterrupts, Interrupted, "
             "handle_termination\nhandle_termination()\nguard = sys.argv[1] == 'guard'\ntry:\n"
             "    with (FrameworkImportsDeferInterrupts() if guard else open(__file__)):\n"
             "        import tflite_runtime\n    print('no signal')\n"
             "except (KeyboardInterrupt, Interrupted) as e:\n"
             "    m = sys.modules.get('tflite_runtime')\n    print(type(e).__name__, m.INIT if m else 'gone')\n")
    script = tmp_path / "probe.py"
    script.write_text(probe)
    for sig, name in ((signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Interrupted")):
        path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "SIG": str(int(sig)), "PYTHONPATH": path}
        run = [sys.executable, str(script)]
        guarded = subprocess.run([*run, "guard"], capture_output=True, text=True, env=env, timeout=60)
        bare = subprocess.run([*run, "bare"], capture_output=True, text=True, env=env, timeout=60)
        assert guarded.stdout.split() == [name, "done"], guarded.stderr
        assert bare.stdout.split() == [name, "gone"], bare.stderr  # without the guard the import is broken off
