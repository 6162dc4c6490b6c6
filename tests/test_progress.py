"""The progress display over an export (``edge3dfa.progress``): line-based off a terminal, one bar on it, an ETA
from the steps done, and timings that account for every second (issue 19, "quiet, informative logs")."""

from __future__ import annotations

import io
import re

import pytest

from edge3dfa import progress
from edge3dfa.progress import OTHER, OVERHEAD, REFERENCE, Progress


class Clock:
    """A clock the test moves by hand, so durations and the ETA are known exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def _run_plan(clock: Clock, out: io.StringIO, interactive: bool = False) -> Progress:
    """Two artifacts converted (convert 10 s / 20 s, parity 2 s each), then evaluated; 1 s between steps."""
    bar = Progress(["onnx fp32", "onnx int8"], steps=("convert", "parity", "evaluate"),
                   reference_steps=("evaluate",), file=out, interactive=interactive, started=clock.now - 5,
                   clock=clock)
    with bar:
        for label, convert_s in (("onnx fp32", 10), ("onnx int8", 20)):
            with progress.target(label):
                clock.tick(1)
                with progress.step("convert"):
                    clock.tick(convert_s)
                with progress.step("parity"):
                    clock.tick(2)
        with progress.target(REFERENCE), progress.step("evaluate"):
            clock.tick(4)
        for label in ("onnx fp32", "onnx int8"):
            with progress.target(label), progress.step("evaluate"):
                clock.tick(3)
        clock.tick(1)
    return bar


def test_off_a_terminal_every_step_is_one_plain_line_naming_artifact_i_of_n():
    clock, out = Clock(), io.StringIO()
    _run_plan(clock, out)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no carriage returns or escapes in a CI log
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("export [")]
    assert len(steps) == 7  # 3 steps x 2 artifacts + the reference's evaluation
    assert steps[0].startswith("export [1/7] artifact 1 of 2 (onnx fp32): convert; 0:06 elapsed, ETA ?")
    # 5 + (1 + 10 + 2) + 1 s in; ETA: its convert 10 + parity 2, three evaluations at the mean of all steps so far, 6
    assert steps[2] == "export [3/7] artifact 2 of 2 (onnx int8): convert; 0:19 elapsed, ETA 0:30"
    assert steps[3].startswith("export [4/7] artifact 2 of 2 (onnx int8): parity")
    assert steps[4].startswith("export [5/7] reference: evaluate")
    assert steps[6].startswith("export [7/7] artifact 2 of 2 (onnx int8): evaluate")
    assert lines[-1] == "export: 7 steps in 0:52"  # 5 s before + 2 x (1 + convert + 2) + 4 + 3 + 3 + 1
    assert "ETA = steps left x the mean duration" in lines[0]  # what the ETA is based on, said once


def test_eta_is_the_steps_left_times_the_mean_of_finished_steps_of_their_kind():
    clock = Clock()
    bar = Progress(["a", "b"], steps=("convert", "evaluate"), reference_steps=(), file=io.StringIO(),
                   interactive=False, clock=clock)
    with bar:
        assert bar.eta() is None  # nothing finished: unknown, not a guess
        with progress.target("a"):
            with progress.step("convert"):
                clock.tick(30)
            # left: b convert (30, from a's) + a and b evaluate (no evaluation yet: mean of all finished, 30)
            assert bar.eta() == pytest.approx(90)
            with progress.step("evaluate"):
                clock.tick(6)
        # left: b convert 30 + b evaluate 6
        assert bar.eta() == pytest.approx(36)


def test_timings_account_for_every_second_in_one_cell():
    clock = Clock()
    bar = _run_plan(clock, io.StringIO())
    t = bar.timings()
    assert t["total_s"] == pytest.approx(52)
    rows = {r["target"]: r for r in t["rows"]}
    assert sum(r["total"] for r in t["rows"]) == pytest.approx(t["total_s"])
    assert (rows["onnx fp32"]["convert"], rows["onnx int8"]["convert"]) == (pytest.approx(10), pytest.approx(20))
    assert rows["onnx int8"]["parity"] == pytest.approx(2) and rows["onnx int8"][OTHER] == pytest.approx(1)
    assert rows[REFERENCE]["evaluate"] == pytest.approx(4) and rows[REFERENCE]["convert"] is None
    assert rows[OVERHEAD]["total"] == pytest.approx(6)  # before the first target, and after the last
    clock.tick(60)  # the display is closed: later time is not the export's
    assert bar.timings()["total_s"] == pytest.approx(52)


def test_a_failed_target_moves_the_count_on_and_an_unplanned_one_is_added():
    clock, out = Clock(), io.StringIO()
    bar = Progress(["a"], steps=("convert", "evaluate"), reference_steps=(), file=out, interactive=False,
                   clock=clock)
    with bar:
        with progress.target("a"):
            with pytest.raises(RuntimeError), progress.step("convert"):
                raise RuntimeError("conversion failed")
            progress.skip_rest()  # its evaluation will not run
        assert bar.steps_done() == 2
        with progress.target("b"), progress.step("evaluate"):  # e.g. an artifact found but not planned
            pass
    assert "artifact 2 of 2 (b): evaluate" in out.getvalue()


def test_without_a_display_the_helpers_do_nothing_but_print(capsys):
    with progress.target("x"), progress.step("convert"):
        progress.skip_rest()
    progress.echo("a log line")
    progress.status("converting ...")
    assert progress.active() is None
    assert capsys.readouterr().err == "a log line\nconverting ...\n"


def test_on_a_terminal_one_bar_and_log_lines_above_it():
    import time

    clock, out = Clock(), io.StringIO()
    bar = Progress(["onnx fp32"], steps=("convert",), reference_steps=(), file=out, interactive=True, clock=clock)
    with bar, progress.target("onnx fp32"), progress.step("convert"):
        progress.status("converting ...")  # said by the bar: not printed
        progress.echo("a log line")
        clock.tick(3)
        for _ in range(100):  # the bar is redrawn every second during a step, its elapsed time moving
            if "0:03 elapsed" in out.getvalue():
                break
            time.sleep(0.05)
    text = out.getvalue()
    assert "artifact 1 of 1 (onnx fp32): convert" in text and "\r" in text  # a redrawn bar
    assert "0:00 elapsed, ETA ?" in text and "0:03 elapsed, ETA ?" in text
    assert "a log line\n" in text and "converting ..." not in text
    assert not [line for line in re.split("[\r\n]", text) if line.startswith("export [")]  # no plain step lines


def test_off_a_terminal_the_display_picks_plain_lines_by_itself():
    """In a subprocess whose stderr is a pipe (as in CI), nobody says ``interactive``: lines, no bar."""
    import subprocess
    import sys

    script = ("from edge3dfa import progress\n"
              "with progress.Progress(['onnx fp32', 'onnx int8'], steps=('convert',), reference_steps=()):\n"
              "    for a in ('onnx fp32', 'onnx int8'):\n"
              "        with progress.target(a), progress.step('convert'):\n"
              "            progress.echo('a log line')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(";")[0] for line in lines[1:5]] == [
        "export [1/2] artifact 1 of 2 (onnx fp32): convert", "a log line",
        "export [2/2] artifact 2 of 2 (onnx int8): convert", "a log line"]


# ---------------------------------------------------------------- export --quick: the first run (make demo)

def _export_args(*argv: str):  # noqa: ANN202
    from edge3dfa.cli import build_parser
    from edge3dfa.workflows.export import apply_quick

    args = build_parser().parse_args(["export", *argv])
    apply_quick(args)
    return args


def test_without_quick_export_keeps_the_full_defaults_validate_has():
    from edge3dfa.cli import build_parser

    full, validate = _export_args(), build_parser().parse_args(["validate", "folder"])
    assert full.precision is None and full.quick_set == []  # every format's default precisions
    for key in ("samples", "latency_batch", "latency_budget"):
        assert getattr(full, key) == getattr(validate, key), key


def test_quick_fills_in_only_what_the_command_line_does_not_say():
    quick = _export_args("--quick")
    assert (quick.precision, quick.samples, quick.latency_batch, quick.latency_budget) == ("fp32,int8", "500", (1,),
                                                                                          0.5)
    mixed = _export_args("--quick", "--samples", "1000", "--precision", "fp32", "--latency-batch", "1,8")
    assert (mixed.precision, mixed.samples, mixed.latency_batch, mixed.latency_budget) == ("fp32", "1000", (1, 8),
                                                                                          0.5)
    assert mixed.quick_set == ["latency_budget"]


def test_quick_plans_fp32_and_int8_of_every_installed_format_and_lists_what_it_left_out():
    from edge3dfa.converters import get_format
    from edge3dfa.workflows.export import plan_export

    full_plan, _ = plan_export(_export_args())
    plan, not_attempted = plan_export(_export_args("--quick"))
    assert [f.name for f, _ in plan] == [f.name for f, _ in full_plan]  # every installed format still
    left = {n["what"]: n["reason"] for n in not_attempted}
    for fmt, precs in plan:
        defaults = get_format(fmt.name).default_precisions
        assert precs == [p for p in ("fp32", "int8") if p in fmt.precisions]
        for p in defaults:
            assert p in precs or "--quick" in left[f"{fmt.name} {p}"]


@pytest.mark.slow
def test_export_in_a_pipe_shows_steps_as_lines_and_reports_where_the_time_went(tmp_path):
    """``edge3dfa export --quick`` of the toy format (tests/toyformat: no framework to convert with) in a
    subprocess: one plain line per step naming artifact i of n, and report.json ``timings`` that add up to the
    run's wall time less start-up and report writing."""
    import json
    import time

    from conftest import run_cli
    from test_toy_format import TOY_ENV

    began = time.perf_counter()
    done = run_cli("export", "--to", "toy", "--quick", "--samples", "20", "--latency-runs", "3", "--latency-warmup",
                   "1", "--latency-threads", "1", "--out", tmp_path, env=TOY_ENV)
    wall = time.perf_counter() - began
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    steps = [line.split(";")[0] for line in done.stderr.splitlines() if line.startswith("export [")]
    # toy offers fp32 and fp16 (opt-in), no int8: one artifact, 4 steps, the reference 2
    toy = "artifact 1 of 1 (toy fp32)"
    assert steps == [f"export [1/6] {toy}: convert", f"export [2/6] {toy}: parity", "export [3/6] reference: evaluate",
                     "export [4/6] reference: latency", f"export [5/6] {toy}: evaluate", f"export [6/6] {toy}: latency"]
    report = json.loads((tmp_path / "mb05" / "report.json").read_text())
    assert report["verdict"] == "PASSED"
    assert report["not_attempted"] == [  # the toy format takes no detector: said, not counted as an artifact
        {"what": "toy int8", "reason": "toy offers fp32, fp16"},
        {"what": "faceboxes toy", "reason": "toy writes landmark regressors only, not the FaceBoxes detector"}]
    t = report["timings"]
    rows = {r["target"]: r for r in t["rows"]}
    assert set(rows) == {"overhead", "toy fp32", "reference"}
    assert all(rows["toy fp32"][s] > 0 for s in ("convert", "parity", "evaluate", "latency"))
    assert sum(r["total"] for r in t["rows"]) == pytest.approx(t["total_s"], abs=1e-3)
    # not counted: the interpreter's start and imports before the command, writing the report after it
    assert 0.5 * wall < t["total_s"] < wall
    assert "## Time" in (tmp_path / "mb05" / "report.md").read_text()

    # validate shows the same display over the folder export wrote: the reference, then the artifact
    done = run_cli("validate", tmp_path / "mb05", "--samples", "20", "--latency-runs", "0", "--report-dir",
                   tmp_path / "validated", env=TOY_ENV)
    assert done.returncode == 0, done.stderr
    steps = [line.split(";")[0] for line in done.stderr.splitlines() if line.startswith("validate [")]
    assert steps == ["validate [1/2] reference: evaluate", f"validate [2/2] {toy}: evaluate"]
    assert json.loads((tmp_path / "validated" / "report.json").read_text())["timings"]["total_s"] > 0


def test_quick_judges_with_the_same_gates_as_the_full_export():
    """Fewer faces make the judge noisier, not kinder: the limits do not move (README "Verdict and default gates")."""
    from edge3dfa.workflows.export import export_gates

    for extra in ([], ["--nme-budget", "0.05"], ["--max-delta-nme", "0.3"]):
        quick, full = _export_args("--quick", *extra), _export_args(*extra)
        assert export_gates(quick, {"int8"}).to_dict() == export_gates(full, {"int8"}).to_dict(), extra


def test_export_shows_each_step_and_times_it_with_the_heavy_parts_stood_in(tmp_path, monkeypatch, capsys):
    """``edge3dfa export`` in-process, conversion and evaluation replaced by stand-ins that take known times (no
    framework runs): its stderr names artifact i of n line by line, and report.json's ``timings`` hold those
    times and add up to the command's wall time, less what comes after the report is built (writing it)."""
    import json
    import time

    import edge3dfa.validation.harness as harness
    import edge3dfa.workflows as workflows
    from edge3dfa.cli import main

    def convert(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - stands in for workflows.convert
        with progress.step("convert"):
            time.sleep(0.3)
        with progress.step("parity"):
            time.sleep(0.1)
        return []

    def evaluate(entries, data, **kwargs):  # noqa: ANN001, ANN003, ANN202 - stands in for harness.evaluate
        for target in (REFERENCE, "onnx fp32"):
            with progress.target(target):
                for step in ("evaluate", "latency"):
                    with progress.step(step):
                        time.sleep(0.1)
        return {"models": {}, "targets": []}

    monkeypatch.setattr(workflows, "convert", convert)
    monkeypatch.setattr(harness, "evaluate", evaluate)
    began = time.perf_counter()
    main(["export", "--to", "onnx", "--precision", "fp32", "--samples", "5", "--no-detector", "--out", str(tmp_path)])
    wall = time.perf_counter() - began
    err = capsys.readouterr().err
    assert [line.split(";")[0] for line in err.splitlines() if line.startswith("export [")] == [
        "export [1/6] artifact 1 of 1 (onnx fp32): convert", "export [2/6] artifact 1 of 1 (onnx fp32): parity",
        "export [3/6] reference: evaluate", "export [4/6] reference: latency",
        "export [5/6] artifact 1 of 1 (onnx fp32): evaluate", "export [6/6] artifact 1 of 1 (onnx fp32): latency"]
    t = json.loads((tmp_path / "mb05" / "report.json").read_text())["timings"]
    rows = {r["target"]: r for r in t["rows"]}
    assert rows["onnx fp32"]["convert"] == pytest.approx(0.3, abs=0.1)
    assert rows["reference"]["latency"] == pytest.approx(0.1, abs=0.1)
    assert sum(r["total"] for r in t["rows"]) == pytest.approx(t["total_s"], abs=1e-3)
    assert 0.7 < t["total_s"] < wall < t["total_s"] + 2  # untimed: parsing the command line, writing the report


def test_a_closed_stderr_is_written_to_devnull_not_an_internal_error():
    """``edge3dfa export ... 2>&-``: Python starts with ``sys.stderr`` None, and the first tqdm bar (reading the
    crops) ended in an internal error, exit 3. The display, a bar and a log line must go nowhere, the command on,
    and fd 2 must not be left free for the next file opened (a C library's warnings would go into it)."""
    import os
    import subprocess
    import sys

    work = ("def work(args):\n"
            "    import os\n"
            "    from edge3dfa import progress\n"
            "    from edge3dfa.datasets.aflw2000_3d import _progress\n"
            "    with progress.Progress(['onnx fp32']), progress.target('onnx fp32'), progress.step('convert'):\n"
            "        list(_progress(range(3), 'reading crops', 3))\n"
            "        progress.echo('a log line')\n"
            "    print('fd2', os.path.realpath('/proc/self/fd/2'))\n"
            "    return 0\n"
            "cli.cmd_models = work\n")
    script = f"import sys\nimport edge3dfa.cli as cli\n{work}sys.exit(cli.main(['models']))\n"
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=lambda: os.close(2))
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1] == f"fd2 {os.devnull}", done.stdout


@pytest.mark.parametrize("columns, term, bar", [(0, "xterm", False), (120, "dumb", False), (120, "xterm", True)])
def test_a_terminal_a_bar_cannot_be_drawn_on_gets_plain_lines(columns, term, bar):
    """stderr a tty, but of zero columns (a fresh pty: ``script``, some ``docker exec -t``), where tqdm draws
    nothing, so the display showed no step at all; or ``TERM=dumb``, which cannot move the cursor for the nested
    bars. Both get the plain lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    script = ("from edge3dfa import progress\n"
              "with progress.Progress(['onnx fp32'], steps=('convert',), reference_steps=()):\n"
              "    with progress.target('onnx fp32'), progress.step('convert'):\n"
              "        pass\n")
    done = subprocess.run([sys.executable, "-c", script], stderr=slave, timeout=60,
                          env={**os.environ, "TERM": term})
    os.close(slave)
    text = b""
    try:
        while chunk := os.read(master, 65536):
            text += chunk
    except OSError:  # the pty's other end is closed: all read
        pass
    os.close(master)
    assert done.returncode == 0
    lines = "export [1/1] artifact 1 of 1 (onnx fp32): convert" in text.decode()
    assert lines != bar and (b"\r" + b"artifact 1 of 1 (onnx fp32): convert |" in text) == bar, text
