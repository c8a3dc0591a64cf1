"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- tested: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no tested block {name!r}"
    return match.group(1)


def test_custom_loop_example_runs_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("custom-loop"), str(README), "exec"), {"__name__": "readme"})
    assert "loss at step 40:" in capsys.readouterr().out
    assert (tmp_path / "snapshots" / "state_40" / "manifest.json").exists()
