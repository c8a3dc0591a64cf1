"""`functrain plot`: the real CLI draws a run and its branch into a PNG that is not blank."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def test_plot_a_run_and_its_branch(tmp_path):
    common = (TINY, f"out_dir={tmp_path}", "name=A", "log_every=2")
    cli("run", *common, "--until", "20")
    cli("resume", *common, "--from", "latest")
    cli("resume", *common, "--from", "state_30", "--name", "B", "optim.lr=1e-3",
        "--allow-change", "optim.lr")  # fmt: skip
    out = tmp_path / "plot.png"
    res = cli("plot", tmp_path / "A", tmp_path / "B", "--out", out)
    assert f"wrote {out}" in res.stderr
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (700, 1100)
    pixels = image[..., :3].reshape(-1, 3)
    assert (pixels < 0.9).any(axis=1).mean() > 0.02  # lines and text, not a blank page
    blue, orange = np.array([0.12, 0.47, 0.71]), np.array([1.0, 0.5, 0.05])  # C0, C1
    for colour in (blue, orange):  # both runs drawn, each in its colour
        assert (np.abs(pixels - colour).max(axis=1) < 0.03).sum() > 200
    again = cli("plot", tmp_path / "A", "--out", out, check=False)
    assert again.returncode == 2 and "exists" in again.stderr  # never over a file


def test_plot_of_no_run_is_one_paragraph(tmp_path):
    res = cli("plot", tmp_path, "--out", tmp_path / "p.png", check=False)
    assert res.returncode == 2 and "no run directory" in res.stderr
    assert "Traceback" not in res.stderr
