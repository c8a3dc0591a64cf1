"""`functrain plot RUN... --out FILE.png`: what runs did, from their `metrics.jsonl`.

Four panels against the step: train loss (raw, faint, and smoothed), eval loss, learning
rate, throughput (samples/s). Each run has one colour; a run's resume points are dotted
vertical lines, its branch point (where it left its parent) a dashed one.
A branch's history starts with its parent's, so a run and its branches overlaid show where
they part. matplotlib is the optional extra `functrain[plot]`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from functrain.cli.report import lineage
from functrain.errors import RunError
from functrain.run import rundir

__all__ = ["plot", "smooth"]

#: The weight of the past in the smoothed train loss (an exponential moving average).
SMOOTHING = 0.8


def plot(runs: list[Path], out: Path) -> Path:
    """Draw `runs` into the PNG `out` (never over an existing file); return `out`."""
    if importlib.util.find_spec("matplotlib") is None:
        raise RunError(
            "functrain plot needs matplotlib, an optional extra: pip install 'functrain[plot]'"
        )
    if out.exists():
        raise RunError(f"{out} exists; give another --out, or remove it")
    if out.suffix.lower() != ".png":
        raise RunError(f"--out {out}: give a .png file")
    histories = {run: _history(run) for run in runs}
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = {
        "train loss": axes[0][0],
        "eval loss": axes[0][1],
        "learning rate": axes[1][0],
        "samples/s": axes[1][1],
    }
    for i, (run, rows) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        ax = panels["train loss"]
        ax.plot(steps, loss, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(loss), color=colour, linewidth=1.8, label=run.name)
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if evals:
            panels["eval loss"].plot(*zip(*evals, strict=True), color=colour, marker="o",
                                     markersize=3, label=run.name)  # fmt: skip
        panels["learning rate"].plot(steps, [r["lr"] for r in rows], color=colour)
        panels["samples/s"].plot(steps, [r["samples_per_s"] for r in rows], color=colour)
        _mark_lineage(run, panels.values(), colour)
    for title, ax in panels.items():
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    panels["train loss"].legend(fontsize=8)
    fig.suptitle(
        "functrain: " + ", ".join(run.name for run in runs)
        + "   (dotted: resume, dashed: branch point)", fontsize=10,
    )  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The exponential moving average of `values`, debiased so it starts at the first."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _history(run: Path) -> list[dict]:
    path = run / rundir.METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run} is no run directory (no {rundir.METRICS_FILE}); give a run")
    rows = rundir.read_metrics(path)
    if not rows:
        raise RunError(f"{path} holds no record yet; plot a run once it has logged a step")
    return rows


def _mark_lineage(run: Path, axes, colour: str) -> None:
    for event in lineage(run)["events"]:
        style = ":" if event["kind"] == "resume" else "--"
        for ax in axes:
            ax.axvline(event["step"], color=colour, linestyle=style, linewidth=1, alpha=0.7)
