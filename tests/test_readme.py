"""Every fenced ``bash`` / ``python`` block of README.md runs as typed (issue 19, "commands as typed").

The README's commands are run in README order, in one temporary working folder, as a user runs them after its
set-up: the environment's ``bin`` on ``PATH`` (as after ``. .venv/bin/activate``; here the folder of the Python
running the tests), the data found through ``EDGE3DFA_ASSETS`` (what ``.venv/etc/edge3dfa/assets`` gives a user).
A shell block is split into commands (one a line, ``\\``-continued lines joined; ``# ...`` lines are comments),
each one a test case that must exit 0 and leave every file its comment promises (``-> photo.json``,
``+ photo_overlay.png``). A python block runs whole, in a fresh interpreter. Blocks depend on earlier ones
(convert, then validate what it wrote), so select the whole file, not one case.

What cannot run here is marked in README.md by an HTML comment just before the fence (invisible on GitHub):

    <!-- readme-test: skip: REASON -->                   the whole block is skipped, with REASON shown
    <!-- readme-test: slow: REASON -->                   run only when asked (EDGE3DFA_README_ALL=1,
                                                         ``make readme-check``), else skipped with REASON
    <!-- readme-test: skip `edge3dfa run --camera`: REASON -->   only the block's commands starting so

A block with neither a run nor a marker cannot exist: every command of every bash/python block is a case, and
``test_readme_markers`` fails on a marker that names no command or stands before no block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_ALL = os.environ.get("EDGE3DFA_README_ALL") == "1"
SHELLS = {"bash", "sh", "shell", "zsh", "console", "shell-session"}
PYTHONS = {"python", "py", "python3", "pycon"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(\w+)\s*(?:`([^`]+)`)?\s*:\s*(.*?)\s*-->\s*$")
# a file a command's comment promises: "-> photo.json", "+ photo_overlay.png", "-> out/demo/"
PROMISED = re.compile(r"(?:->|\+)\s*([A-Za-z_][\w./-]*(?:\.[A-Za-z]\w*|/))(?=[\s),;]|$)")
KINDS = ("skip", "slow")


@dataclass(frozen=True)
class Marker:
    line: int
    kind: str
    prefix: str | None
    reason: str


@dataclass(frozen=True)
class Block:
    line: int  # the fence's line, 1-based
    lang: str  # "shell" or "python"
    body: list[tuple[int, str]]  # (line number, text), the fence's indentation removed
    markers: tuple[Marker, ...]


@dataclass(frozen=True)
class Case:
    block: Block
    line: int
    code: str
    comment: str  # the command's own comment and the comment lines after it
    marker: Marker | None


def parse(text: str) -> tuple[list[Block], list[Marker]]:
    """The runnable blocks in order, and the markers that stand before no runnable block."""
    lines = text.splitlines()
    blocks, pending, orphans = [], [], []
    i = 0
    while i < len(lines):
        if m := MARKER.match(lines[i]):
            pending.append(Marker(i + 1, m[1], m[2], m[3]))
            i += 1
            continue
        if not (f := FENCE.match(lines[i])):
            if lines[i].strip():
                orphans += pending
                pending = []
            i += 1
            continue
        indent, fence, info = len(f[1]), f[2], f[3].lower()
        start, i, body = i + 1, i + 1, []
        while i < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append((i + 1, re.sub(rf"^\s{{0,{indent}}}", "", lines[i])))  # the fence's indentation off
            i += 1
        assert i < len(lines), f"README.md:{start}: the fence is never closed"
        i += 1
        lang = "shell" if info in SHELLS else "python" if info in PYTHONS else None
        if lang is None:
            orphans += pending
        else:
            if info == "console":  # "$ cmd" lines are commands, the others output
                body = [(n, t[2:]) for n, t in body if t.startswith("$ ")]
            elif info == "pycon":
                body = [(n, t[4:]) for n, t in body if t.startswith((">>> ", "... "))]
            blocks.append(Block(start, lang, body, tuple(pending)))
        pending = []
    return blocks, orphans + pending


def commands(block: Block) -> list[tuple[int, str, str]]:
    """(line, command, comment) of a shell block: one command a line, ``\\`` joins lines, ``#`` lines comment."""
    out: list[list] = []
    joining = False
    for n, raw in block.body:
        text = raw.strip()
        if not text:
            joining = False
            continue
        if text.startswith("#") and not joining:
            if out:
                out[-1][2] += " " + text
            continue
        code, comment = split_comment(text)
        if joining:
            out[-1][1] += "\n" + code
            out[-1][2] += " " + comment
        else:
            out.append([n, code.rstrip(), comment])
        joining = code.rstrip().endswith("\\")
    return [(n, c, comment) for n, c, comment in out]


def split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` -> (cmd, comment): the first ``#`` after a blank, outside quotes, starts a comment."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and k and line[k - 1].isspace():
            return line[:k].rstrip(), line[k + 1:]
    return line, ""


def cases(blocks: list[Block]) -> list[Case]:
    out = []
    for b in blocks:
        whole = [m for m in b.markers if m.prefix is None]
        if b.lang == "python":
            out.append(Case(b, b.line, "\n".join(t for _, t in b.body), "", whole[0] if whole else None))
            continue
        for n, code, comment in commands(b):
            named = [m for m in b.markers if m.prefix is not None and code.startswith(m.prefix)]
            out.append(Case(b, n, code, comment, (named + whole or [None])[0]))
    return out


BLOCKS, ORPHANS = parse(README.read_text(encoding="utf-8"))
CASES = cases(BLOCKS)


def problems(text: str) -> list[str]:
    """What is wrong with the markers and fences of a README text (empty: nothing)."""
    blocks, orphans = parse(text)
    found = cases(blocks)
    out = [f"line {m.line}: a marker before no bash/python block" for m in orphans]
    out += [f"line {n}: not a marker: {t.strip()}" for n, t in enumerate(text.splitlines(), 1)
            if "readme-test" in t and not MARKER.match(t)]
    for b in blocks:
        out += [] if b.body else [f"line {b.line}: an empty block"]
        for m in b.markers:
            if m.kind not in KINDS or not m.reason:
                out.append(f"line {m.line}: a marker needs a kind {KINDS} and a reason")
            if m.prefix is not None and not any(c.marker == m for c in found):
                out.append(f"line {m.line}: `{m.prefix}` names no command of the block")
    # an independent count of the opening fences with a runnable language: none escapes the parser
    openings, inside = 0, None
    for line in text.splitlines():
        s = line.strip()
        if inside is None and s.startswith(("```", "~~~")):
            inside = s[:3]
            openings += s.strip("`~ ").split(" ")[0].lower() in SHELLS | PYTHONS
        elif inside is not None and s.startswith(inside) and not s.strip("`~"):
            inside = None
    if openings != len(blocks):
        out.append(f"{openings} bash/python fences, {len(blocks)} parsed")
    return out


def test_readme_markers():
    """Every marker of README.md is a known kind with a reason, stands before a bash/python block and, when it
    names a command, names one of that block's; every such block is parsed (none escapes by its fence)."""
    assert BLOCKS and not problems(README.read_text(encoding="utf-8"))


def test_readme_parser_on_a_made_up_readme():
    text = "\n".join([
        "<!-- readme-test: skip `tool run --camera`: needs a camera -->",  # 1
        "```Bash",
        "tool run a.jpg   # -> a.json",
        "                 #    + a_overlay.png (drawn)",
        "tool run --camera 0 \\",  # 5
        "    --max-frames 2",
        "```",
        "- a list item:",
        "",
        "   ```python",  # 10
        "   for i in range(2):",
        "       print(i)",
        "   ```",
        "<!-- readme-test: slow: reason -->",
        "```text",  # 15
        "not run",
        "```",
        "<!-- readme-test: skip `nothing`: names no command -->",
        "<!-- readme-test: later: no such kind -->",
        "~~~console",  # 20
        "$ tool models",
        "a table",
        "~~~",
        "<!-- readme-test skip: no colon -->",
    ])
    blocks, _ = parse(text)
    got = [(c.line, c.code, PROMISED.findall(c.comment), c.marker and c.marker.kind) for c in cases(blocks)]
    assert got == [(3, "tool run a.jpg", ["a.json", "a_overlay.png"], None),
                   (5, "tool run --camera 0 \\\n--max-frames 2", [], "skip"),
                   (10, "for i in range(2):\n    print(i)", [], None),
                   (21, "tool models", [], "later")]
    assert problems(text) == ["line 14: a marker before no bash/python block",
                              "line 24: not a marker: <!-- readme-test skip: no colon -->",
                              "line 18: `nothing` names no command of the block",
                              "line 19: a marker needs a kind ('skip', 'slow') and a reason"]


def make_clip(photo: Path, dest: Path, frames: int = 12, fps: int = 12) -> None:
    """A short clip of ``photo`` sliding sideways: an input the README's video commands can read."""
    img = cv2.imread(str(photo))
    h, w = img.shape[:2]
    img = cv2.resize(img, (320, round(h * 320 / w) // 2 * 2))
    writer = cv2.VideoWriter(str(dest), cv2.VideoWriter_fourcc(*"mp4v"), fps, (img.shape[1], img.shape[0]))
    for k in range(frames):
        shift = np.float32([[1, 0, 2 * k - frames], [0, 1, 0]])
        writer.write(cv2.warpAffine(img, shift, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT))
    writer.release()
    assert dest.stat().st_size > 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, assets_dir) -> Path:
    """The folder the README's commands run in. The README uses placeholders for a user's own files; the test
    supplies them here, from the assets (README "Data"): ``photo.jpg`` = the example photo emma.jpg, ``photos/``
    = the three example photos, ``clip.mp4`` = a 1 s clip of that photo sliding sideways, ``my_mbv3.pth`` =
    the MobileNet-V3-small fixture (a checkpoint in upstream's layout). ``.venv`` links to the environment
    running the tests, so ``. .venv/bin/activate`` runs as typed (this folder stands for the repository root)."""
    work = tmp_path_factory.mktemp("readme")
    examples = assets_dir / "upstream" / "3ddfa_v2" / "examples" / "inputs"
    shutil.copy(examples / "emma.jpg", work / "photo.jpg")
    shutil.copytree(examples, work / "photos")
    make_clip(work / "photo.jpg", work / "clip.mp4")
    (work / "my_mbv3.pth").symlink_to(assets_dir / "fixtures" / "mbv3_05_distilled_120x120.pth")
    if sys.prefix != sys.base_prefix:
        (work / ".venv").symlink_to(sys.prefix)
    return work


def user_env() -> dict[str, str]:
    """The environment of a user's shell after ``. .venv/bin/activate``, the assets named as the venv names them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = sys.prefix
    env["EDGE3DFA_ASSETS"] = os.environ["EDGE3DFA_ASSETS"]  # conftest's default: ../shared/assets
    return env


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"L{c.line} {c.code.splitlines()[0][:60]}" for c in CASES])
def test_readme_command(case: Case, workdir: Path) -> None:
    if case.marker is not None and (case.marker.kind == "skip" or not RUN_ALL):
        how = "skipped" if case.marker.kind == "skip" else "slow: run with EDGE3DFA_README_ALL=1 (make readme-check)"
        pytest.skip(f"README.md:{case.line} {how}: {case.marker.reason}")
    if case.code.startswith(". .venv/bin/activate") and not (workdir / ".venv").exists():
        pytest.skip("the tests do not run in a virtual environment, so there is no .venv to activate")
    argv = [sys.executable, "-c", case.code] if case.block.lang == "python" else \
        ["bash", "-o", "pipefail", "-c", case.code]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=workdir, env=user_env(), capture_output=True, text=True,
                          timeout=3600 if case.marker else 900)
    took = time.perf_counter() - start
    print(f"README.md:{case.line} {took:.1f} s: {case.code.splitlines()[0]}")
    assert proc.returncode == 0, (f"README.md:{case.line} exit {proc.returncode} after {took:.1f} s:\n{case.code}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    missing = [p for p in PROMISED.findall(case.comment) if not (workdir / p).exists()]
    assert not missing, f"README.md:{case.line}: its comment promises {missing}, not written by:\n{case.code}"
