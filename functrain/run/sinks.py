"""Where metrics records go besides `metrics.jsonl` (the source of truth): TensorBoard and
Weights & Biases, each when the recipe's `log:` section asks for it.

Both follow the run's resumes and branches. TensorBoard is cut back as `metrics.jsonl` is,
so no step appears twice; W&B drops steps it has seen (its own rule), so after a crash past
the last snapshot its chart keeps the points of the lost steps.

    TensorBoard  <run>/tensorboard/   a resume opens a writer with `purge_step` = the
                                      snapshot's step + 1: TensorBoard's readers drop the
                                      later events of the earlier files; a branch copies
                                      its parent's files first
    W&B          <run>/wandb.json     the W&B run id: a resume continues that W&B run
                                      (`resume="allow"`), a branch starts a new one forked
                                      from the parent's at the branch step (`fork_from`,
                                      online only; offline it records the parent in config)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

import orjson

from functrain.errors import RunError
from functrain.recipe import Recipe, to_dict
from functrain.run import rundir

__all__ = ["TENSORBOARD_DIR", "WANDB_FILE", "Sink", "open_sinks", "require"]

TENSORBOARD_DIR = "tensorboard"
WANDB_FILE = "wandb.json"


class Sink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def require(recipe: Recipe) -> None:
    """Refuse, before anything is written, a sink whose optional package is missing."""
    wanted = {"tensorboard": recipe.log.tensorboard, "wandb": recipe.log.wandb}
    for extra, on in wanted.items():
        if on and importlib.util.find_spec(extra) is None:
            raise RunError(
                f"log.{extra}: true needs the `{extra}` package, an optional extra: "
                f"pip install 'functrain[{extra}]' (or set log.{extra}=false)"
            )


def open_sinks(recipe: Recipe, run_dir: Path, step: int, parent: Path | None) -> list[Sink]:
    """The recipe's sinks for `run_dir`, which resumes at `step` (0: a new run); `parent` is
    the run directory a branch was made from."""
    sinks: list[Sink] = []
    try:
        if recipe.log.tensorboard:
            sinks.append(_TensorBoard(run_dir, step, parent))
        if recipe.log.wandb:
            sinks.append(_WandB(recipe, run_dir, step, parent))
    except BaseException:  # close those that opened before the one that failed
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


class _TensorBoard:
    def __init__(self, run_dir: Path, step: int, parent: Path | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        events = run_dir / TENSORBOARD_DIR
        if parent is not None and (parent / TENSORBOARD_DIR).is_dir() and not events.exists():
            shutil.copytree(parent / TENSORBOARD_DIR, events)
        self._writer = SummaryWriter(str(events), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        for name, value in _scalars(record).items():
            self._writer.add_scalar(name, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandB:
    def __init__(self, recipe: Recipe, run_dir: Path, step: int, parent: Path | None) -> None:
        import wandb

        path = run_dir / WANDB_FILE
        kwargs: dict[str, Any] = {
            "project": recipe.log.wandb_project,
            "name": recipe.name,
            "dir": str(run_dir),
            "config": to_dict(recipe),
        }
        if path.exists():  # a resume in place: the same W&B run
            kwargs.update(id=orjson.loads(path.read_bytes())["id"], resume="allow")
        else:
            kwargs["id"] = uuid.uuid4().hex[:12]
            source = parent / WANDB_FILE if parent is not None else None
            if source is not None and source.exists():  # a branch: a fork of the parent's
                parent_id = orjson.loads(source.read_bytes())["id"]
                kwargs["config"] = {**kwargs["config"], "functrain_parent": parent_id,
                                    "functrain_branch_step": step}  # fmt: skip
                if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
                    kwargs["fork_from"] = f"{parent_id}?_step={step}"
            rundir.write_atomic(path, orjson.dumps({"id": kwargs["id"]}))
        try:
            self._run = wandb.init(**kwargs)
        except Exception as err:  # no login, no network, a bad project: say what to do
            raise RunError(
                f"log.wandb: W&B did not start ({type(err).__name__}: {err}). Log in with "
                "`wandb login`, or train offline with WANDB_MODE=offline (sync later with "
                "`wandb sync`), or set log.wandb=false"
            ) from err

    def write(self, record: dict) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()
