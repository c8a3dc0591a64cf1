"""The run loop: the side effects (log, eval, snapshot, preemption) around the pure step.

    batch = next(loader)            # the loader was positioned from the state's cursor
    state = step(state, batch)
    every N: log / eval / snapshot  # the only places the host syncs

`Trainer(built, state, run_dir).run()` reads top to bottom: set up, loop, close. Side
effects depend on the step number only, so an interrupted and resumed run does exactly what
an unbroken one does. Snapshots go through the run's one `checkpoint.Snapshots` manager.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from functrain import data as data_lib
from functrain import determinism, distributed
from functrain.checkpoint import NonFiniteError, Policy, Snapshots, read_manifest
from functrain.checkpoint.manager import write_seconds_of
from functrain.errors import RunError
from functrain.metrics import Metric, finish, measure
from functrain.recipe import CheckpointConfig
from functrain.run import preempt, rundir, sinks
from functrain.run.build import Built, to_device, train_loader, val_loader
from functrain.run.progress import Progress, append_metrics, tokens_per_sample
from functrain.state import TrainState
from functrain.steps import split
from functrain.steps import step as run_step

__all__ = ["Trainer", "evaluate", "policy"]


def policy(config: CheckpointConfig) -> Policy:
    """The snapshot policy of a recipe's `checkpoint:` section."""
    return Policy(
        every=config.every,
        keep_last=config.keep_last,
        keep_every=config.keep_every,
        async_save=config.async_save,
        on_error=config.on_error,
        trainable_only=config.trainable_only,
    )


def _data_state(dataset: Any):
    """For a stateful iterable: its position at each snapshot, for the manifest."""
    if not data_lib.is_stateful(dataset):
        return None
    return lambda: {"data_state": data_lib.data_state(dataset)}


#: `state.stats` entries of fp16's loss scaler that each metrics record carries.
_SCALER_STATS = ("loss_scale", "skipped_steps")


@contextlib.contextmanager
def _evaluating(state: TrainState, device: torch.device) -> Iterator[torch.nn.Module]:
    """The model with `state` bound, in eval mode (dropout off, running statistics used and
    left alone), in the state's precision, without autograd; in train mode again after."""
    model = state.static.model
    model.eval()
    try:
        with torch.no_grad(), state.bind() as bound, state.static.precision.autocast(device):
            yield bound
    finally:
        model.train()


@torch.no_grad()
def evaluate(
    state: TrainState,
    batches: Iterator[Any],
    n: int,
    device: torch.device,
    micro_batch_size: int | None = None,
    metrics: Sequence[Metric] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, metric totals) over `n` batches: the model in eval mode (dropout off, running
    statistics used and left as they are), no RNG drawn, state unchanged; in the state's
    precision (autocast), as training computes it.

    The loss is the mean over the batches; with `micro_batch_size`, the loss of each
    micro-batch of each batch instead, shape (n, micro-batches per batch), for
    `Trainer._eval` to average in global order. The totals are each metric's (sum, count)
    over the batches (`functrain.metrics`), float64 [len(metrics), 2], or None."""
    losses = []
    totals = torch.zeros((len(metrics), 2), dtype=torch.float64, device=device)
    with _evaluating(state, device) as model:
        for _ in range(n):
            batch = to_device(next(batches), device)
            for micro in [batch] if micro_batch_size is None else split(batch, micro_batch_size):
                losses.append(state.static.loss(model, micro).float())
            if metrics:
                totals += measure(metrics, model, batch, device)
    if micro_batch_size is None:
        total = torch.zeros((), device=device)
        for loss in losses:
            total += loss
        loss = total / n
    else:
        loss = torch.stack(losses).view(n, -1)
    return loss, totals if metrics else None


class Trainer:
    """One process's part of a run: train `built` from `state` to the recipe's last step."""

    def __init__(
        self,
        built: Built,
        state: TrainState,
        run_dir: Path,
        *,
        meta: dict | None = None,
        resumed_from: Path | None = None,
        until: int | None = None,
        recipe_path: str = "<recipe>",
        data_restored: bool = False,
    ) -> None:
        """`meta` goes into every manifest beside the recipe, data fingerprint and device;
        retention spares `resumed_from`. With `until`, training stops after that step (a
        snapshot of it is written) and `run` returns 0; `recipe_path` is what messages name;
        `data_restored`: a stateful iterable stands at the state's cursor already."""
        self.built, self.recipe, self.ctx = built, built.recipe, built.context
        self.state, self.run_dir = state, run_dir
        self.until, self.recipe_path = until or built.recipe.steps, recipe_path
        self.data_restored = data_restored
        manifest_meta = {**built.description, **(meta or {})}
        self.snapshots = Snapshots(
            run_dir,
            policy(self.recipe.checkpoint),
            context=self.ctx,
            sharding=built.sharding,
            meta=manifest_meta,
            keep=[resumed_from],
            meta_now=_data_state(built.train),
        )
        if resumed_from is not None:  # a stop before this process's first snapshot: its budget
            self.snapshots.write_seconds = write_seconds_of(read_manifest(resumed_from))
        if self.recipe.determinism != "strict":
            self.ctx.warn(
                f"determinism: {self.recipe.determinism}: ops without a deterministic kernel "
                "may run, so this run is not promised bitwise (on resume either)"
            )
        self.preemption = preempt.Preemption(self.recipe.checkpoint.signal)
        self.agreement = distributed.Agreement(  # every rank: a collective
            self.ctx.world_size, timeout=distributed.collective_timeout()
        )
        self.progress = Progress(self.recipe.steps, int(state.step)) if self.ctx.is_main else None
        parent = resumed_from.parent if resumed_from is not None else None
        branched = parent is not None and parent.resolve() != run_dir.resolve()
        self.sinks = self.ctx.all_ok(  # one that fails to start stops every rank alike
            lambda: (
                sinks.open_sinks(
                    self.recipe, run_dir, int(state.step), parent if branched else None
                )
                if self.ctx.is_main
                else []
            )
        )
        self._last_log: tuple[float, int]  # (time, samples) of the last record: set by train()

    def run(self) -> int:
        """Train to the end, or until preempted; the process's exit status."""
        try:
            with self.snapshots, self.preemption:  # waits for the last write, raises its error
                final = self.train()
                self.snapshots.wait_until_finished()
                step = int(final.step)
                if step < self.until and self.ctx.is_main:  # said while a second
                    # SIGTERM (e.g. torchrun's) may be on its way
                    requested = self.preemption.requested
                    message = preempt.stopped_message(
                        requested, self.run_dir, step, self.recipe_path
                    )
                    print(message, file=sys.stderr)
        finally:
            if self.progress is not None:
                self.progress.close()
            for sink in self.sinks:
                sink.close()
        if step < self.until:
            return preempt.EXIT_PREEMPTED
        if step < self.recipe.steps:
            if self.progress is not None:
                self.progress.message(
                    f"stopped after step {step} (--until); "
                    + preempt.continue_hint(self.run_dir, step, self.recipe_path)
                )
            return 0
        if self.progress is not None:
            self.progress.message(f"done: {self.run_dir} (step {self.recipe.steps})")
        return 0

    def train(self) -> TrainState:
        """The loop: step, log (and eval), agree on stopping, snapshot. Returns the last state."""
        steps, device = self.until, self.built.device
        state, self.state = self.state, None  # donated at every step: the loop owns it
        batches = self._batches(int(state.data["samples"]))
        self._last_log = (time.perf_counter(), int(state.data["samples"]))  # the loader is up
        counted = self.progress is None  # tokens per sample: from the first batch only
        now = int(state.step)  # from here on counted on the host
        while now < steps:
            batch = next(batches)
            if not counted:
                self.progress.tokens, counted = tokens_per_sample(batch), True
            try:
                state = run_step(state, to_device(batch, device))
            except Exception as err:
                self._step_failed(now + 1)
                if (op := determinism.refused_op(err)) is not None:
                    raise RunError(determinism.refusal(op)) from err
                raise
            now += 1
            state = self._log(state, now, batch)
            stop = now < steps and self._should_stop(now)
            if stop:
                self._warn_if_late()
            self.snapshots.maybe_save(state, last=stop or now == steps)
            if stop:
                break
        self.agreement.drain()  # posts not yet due: a stop or failure they carry comes too
        return state  # late to act on; a failed write is settled by the final wait

    def _batches(self, start: int) -> Iterator[Any]:
        loader = train_loader(self.built, start=start, restored=self.data_restored)
        indices = getattr(loader.sampler, "batch_indices", None)  # none for iterables
        return distributed.traced(
            iter(loader), self.ctx, start, self.recipe.data.batch_size, indices
        )

    def _step_failed(self, step: int) -> None:
        """Say, before the error goes up, that the state in memory is gone and where the
        run can go on from: the step donated it (its buffers may hold half an update), so
        nothing of it is saved."""
        # No wait for a write in flight here: that is a collective, and the other ranks may
        # be inside the step. The newest published snapshot is what a resume would take.
        latest = self.snapshots.latest()
        where = (
            f"the newest published snapshot is {latest}: fix the cause, then continue with: "
            f"functrain resume {self.recipe_path} --from latest"
            if latest is not None
            else "the run has no snapshot yet: fix the cause and start it again"
        )
        self.ctx.warn(
            f"step {step} failed, and the state it was given is gone (a step updates it in "
            f"place); nothing of it is saved. {where}"
        )

    def _log(self, state: TrainState, now: int, batch: Any = None) -> TrainState:
        """On log and eval steps: the metrics (one host sync), the eval loss, one record;
        returns the state with `stats.best_eval` updated on eval steps. With
        `log.train_metrics`, the recipe's metrics on the step's `batch` too."""
        log_now, eval_now = self._logs(now)
        if not (log_now or eval_now):
            return state
        samples, t = int(state.data["samples"]), time.perf_counter()
        t_last, samples_last = self._last_log
        self._last_log = (t, samples)
        record = {  # the step's scalars: one host sync for all
            "step": now,
            "loss": state.metrics["loss"].item(),  # already the mean over ranks
            "lr": state.metrics["lr"].item(),
            "grad_norm": state.metrics["grad_norm"].item(),
            "samples_per_s": (samples - samples_last) / max(t - t_last, 1e-9),
        }
        for key, value in state.metrics.items(include_nested=True, leaves_only=True):
            name = key if isinstance(key, str) else "/".join(key)
            if name not in record and value.numel() == 1:  # what a transform of yours adds
                record[name] = value.item()
        for name in _SCALER_STATS:  # fp16's loss scaler, when the state has one
            if name in state.stats:
                record[name] = state.stats[name].item()
        nonfinite = int(state.stats["nonfinite_steps"])
        if nonfinite:  # counted since the run began
            record["nonfinite_steps"] = nonfinite
        stop = nonfinite > 0 and self.recipe.nan_policy == "stop"  # alike on every rank
        if log_now and not stop and self.recipe.log.train_metrics and self.built.metrics:
            record.update({f"train_{k}": v for k, v in self._train_metrics(state, batch).items()})
        if eval_now and not stop:
            value, metrics = self._eval(state)
            best = torch.minimum(state.stats["best_eval"], value)
            state = state.replace(stats=state.stats.replace(best_eval=best))
            record["eval_loss"] = value.item()
            record.update({f"eval_{name}": v for name, v in metrics.items()})
        if self.progress is not None:
            append_metrics(self.run_dir / rundir.METRICS_FILE, record)
            for sink in self.sinks:
                sink.write(record)
            self.progress.update(record)
        if stop:  # after its record: the bad loss is in the log
            raise NonFiniteError(int(state.stats["first_nonfinite"]), self.snapshots.latest())
        return state

    def _train_metrics(self, state: TrainState, batch: Any) -> dict[str, float]:
        """The recipe's metrics on this rank's part of the step's training batch, summed over
        the ranks: with the params after the step's update, in eval mode (as at eval: no
        dropout, no running statistic changed, no RNG drawn), so training keeps its bits."""
        metrics, device, size = (
            self.built.metrics,
            self.built.device,
            self.built.parts.micro_batch_size,
        )
        batch = to_device(batch, device)
        totals = torch.zeros((len(metrics), 2), dtype=torch.float64, device=device)
        with _evaluating(state, device) as model:  # in the step's micro-batches: no more memory
            for micro in [batch] if size is None else split(batch, size):
                totals += measure(metrics, model, micro, device)
        return finish(metrics, self.ctx.gather(totals).sum(0))

    def _eval(self, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean validation loss over the recipe's eval batches and all ranks (of a
        canonical run, the mean of every micro-batch's loss in global order, the same bits
        on any number of processes), and each metric from its sums and counts over every
        batch and rank."""
        if self.recipe.eval.batches == "all":
            return self._eval_all(state)
        batches = iter(val_loader(self.built))
        size = self.built.parts.micro_batch_size
        metrics = self.built.metrics
        loss, totals = evaluate(
            state, batches, self.recipe.eval.batches, self.built.device, size, metrics
        )
        values = {}
        if totals is not None:
            every = self.ctx.gather(totals)  # (ranks, metrics, 2): summed in rank order
            values = finish(metrics, every.sum(0))
        if size is None:
            return self.ctx.mean(loss), values
        every = self.ctx.gather(loss)  # (ranks, batches, micro-batches per rank)
        return every.transpose(0, 1).reshape(-1).sum() / every.numel(), values

    def _eval_all(self, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        """`eval.batches: all`: every validation sample once. The samples are cut, in order,
        into units of the canonical micro-batch size (else the per-rank batch), the last one
        partial; rank r evaluates units r, r + N, ...; the loss is the sum of each unit's
        mean times its size over the sample count, added in unit order after a gather, so
        a canonical run gets the same bits on any number of processes."""
        val, ctx, device = self.built.val, self.ctx, self.built.device
        n = len(val)
        unit = self.built.parts.micro_batch_size or self.built.local_batch
        units = [(a, min(a + unit, n)) for a in range(0, n, unit)]
        mine = units[ctx.rank :: ctx.world_size]
        per_rank = -(-len(units) // ctx.world_size)
        metrics = self.built.metrics
        # per unit: loss * count, count, then each metric's (sum, count)
        rows = torch.zeros((per_rank, 2 + 2 * len(metrics)), dtype=torch.float64, device=device)
        with _evaluating(state, device) as model:
            for j in range(per_rank):  # as many forward passes on every rank (FSDP's are
                # collectives); a rank short of units repeats one, and counts nothing
                a, b = mine[j] if j < len(mine) else units[0]
                batch = to_device(default_collate([val[i] for i in range(a, b)]), device)
                loss = state.static.loss(model, batch).float()
                found = measure(metrics, model, batch, device) if metrics else None
                if j < len(mine):
                    rows[j, 0], rows[j, 1] = loss.double() * (b - a), b - a
                    if found is not None:
                        rows[j, 2:] = found.reshape(-1)
        every = ctx.gather(rows)  # (ranks, per rank, ...): unit u is every[u % R, u // R]
        ordered = every.transpose(0, 1).reshape(-1, rows.shape[1])[: len(units)]
        total = torch.zeros(rows.shape[1], dtype=torch.float64, device=device)
        for row in ordered:  # in unit order: the same sums on any number of processes
            total += row
        loss = (total[0] / total[1]).float()
        values = finish(metrics, total[2:].view(len(metrics), 2)) if metrics else {}
        return loss, values

    def _warn_if_late(self) -> None:
        """On a stop signal: say so when the last snapshot took longer than the launcher's
        grace period, so that this one may be killed before it is published."""
        took, grace = self.snapshots.write_seconds, self.recipe.checkpoint.grace
        if took is None or took <= grace:
            return
        latest = self.snapshots.latest()
        self.ctx.warn(
            f"the last snapshot took {took:.1f} s and the launcher allows {grace:g} s after "
            "SIGTERM (checkpoint.grace): this one may be killed before it is published, and "
            f"the run would then resume from {latest}. Give the job a longer grace period "
            "(SLURM: --signal=TERM@SECONDS ahead of the time limit; Kubernetes: "
            "terminationGracePeriodSeconds), send checkpoint.signal earlier, or snapshot "
            "more often (checkpoint.every)."
        )

    def _logs(self, now: int) -> tuple[bool, bool]:
        """Whether step `now` writes a metrics record, and whether it evaluates."""
        r = self.recipe
        eval_now = bool(r.eval.every and self.built.val is not None) and (
            now % r.eval.every == 0 or now == r.steps
        )
        return now % r.log_every == 0 or now == r.steps, eval_now

    def _should_stop(self, now: int) -> bool:
        """Asked on every rank after every step but the last; all get the same answer, at
        the same step. A failed async write, on any rank, is settled here too (stop or
        warn, per policy). Without a host sync: the flags this step posts are read `LAG`
        steps later (`functrain.distributed.agree`), or at once on a step that syncs
        anyway (it logs, evaluates or snapshots)."""
        every = self.recipe.checkpoint.every
        synced = any(self._logs(now)) or bool(every and now % every == 0)
        asked = self.preemption.requested is not None
        stop, failed = self.agreement.post(now, asked, self.snapshots.failed, now=synced)
        if failed:
            self.snapshots.settle()
        return stop
