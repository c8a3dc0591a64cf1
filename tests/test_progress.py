"""The progress display: a tqdm bar on a terminal (a real pseudo-terminal here) with
messages on their own lines, plain lines when stdout is a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def _under_terminal(args: list[str], cwd: Path, stop_after: bytes | None = None) -> str:
    """Run `functrain ARGS` with stdout and stderr on one pseudo-terminal; with
    `stop_after`, SIGTERM it once that text has appeared. Returns all it wrote."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "functrain", *args], stdout=child, stderr=child, cwd=cwd, env=env
    )
    os.close(child)
    out, sent = b"", False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child side closed: the process is gone
            break
        if not chunk:
            break
        out += chunk
        if stop_after and not sent and stop_after in out:
            proc.send_signal(signal.SIGTERM)
            sent = True
    proc.wait(timeout=60)
    os.close(main)
    return out.decode(errors="replace")


def _lines(text: str) -> list[str]:
    """What a terminal shows on each line: the text after the last carriage return."""
    return [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]


def test_bar_on_a_terminal(tmp_path):
    text = _under_terminal(["run", str(TINY), "steps=10", "log_every=1"], tmp_path)
    bar = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    final = [b for b in bar if "10/10" in b]
    assert final, text
    assert re.search(r"loss \d\.\d{4} \| eval \d\.\d{4} \| lr [\d.e-]+ \| [\d.]+ samples/s \| "
                     r"[\d,]+ tokens/s", final[-1]), final[-1]  # fmt: skip
    assert re.search(r"\| 10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)", final[-1])
    assert "done: runs/tiny (step 10)" in _lines(text)


def test_preemption_message_on_its_own_line_naming_the_recipe(tmp_path):
    text = _under_terminal(
        ["run", str(TINY), "steps=5000", "log_every=1", "checkpoint.every=null"],
        tmp_path,
        stop_after=b"/5000",
    )
    shown = _lines(text)
    stopped = [line for line in shown if "stopped by SIGTERM" in line]
    assert stopped and stopped[0].startswith("functrain: stopped by SIGTERM after step"), text
    assert (
        f"functrain resume {TINY} steps=5000 log_every=1 checkpoint.every=null --from"
        in (stopped[0])
    )


def test_plain_lines_when_not_a_terminal(tmp_path):
    out = cli("run", TINY, "steps=10", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step 5/10 | loss ") and "tokens/s | eta " in lines[0]
    assert lines[-1] == "done: runs/tiny (step 10)"
    assert "\r" not in out.stdout
