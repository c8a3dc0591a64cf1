"""The process group and agreement between ranks: `Context`, `init`, `close`.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one
process. `Context` is the core's `Placement` (world size, rank) plus the few collectives
the run machinery needs to keep every rank on the same path: agree on a value, fail alike,
share a decision (flags raised without a sync: `agree.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import attrs
import torch
import torch.distributed as td

from functrain.errors import RunError, warn
from functrain.parallel import Placement

#: Seconds a collective may wait for the other ranks before the job ends with an error.
TIMEOUT_ENV = "FUNCTRAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
#: Seconds the other ranks wait while a snapshot is written (rank 0 alone writes an
#: unsharded one; a slow disk may take longer than a collective should): a rank that dies
#: meanwhile is seen by torchrun, which ends the job, not by this timeout.
WRITE_TIMEOUT_ENV = "FUNCTRAIN_WRITE_TIMEOUT"
DEFAULT_WRITE_TIMEOUT_S = 4 * 3600.0


def env_rank() -> int:
    """This process's global rank as torchrun announced it (0 without torchrun); no group needed."""
    return int(os.environ.get("RANK", "0"))


@attrs.frozen
class Context(Placement):
    """This process's place in the job, and the collectives that keep the ranks agreed.
    `local_rank`: its place on its node (torchrun's LOCAL_RANK), which picks its GPU."""

    local_rank: int = 0
    #: A gloo group whose collectives wait up to `WRITE_TIMEOUT_ENV` seconds: for the ranks
    #: that wait while others write a snapshot (`all_ok(..., patient=True)`).
    patient: Any = attrs.field(default=None, eq=False, repr=False)

    def barrier(self) -> None:
        if self.world_size > 1:
            td.barrier()

    def warn(self, message: str) -> None:
        """`functrain.errors.warn`, said once: by rank 0."""
        if self.is_main:
            warn(message)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (a collective: every rank must call it)."""
        if self.world_size == 1:
            return t
        t = t.detach().clone()
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t / self.world_size

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, stacked in rank order (a collective: same shape on every rank)."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        td.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    def everyone(self, value: Any) -> list[Any]:
        """Every rank's `value` (plain data), in rank order (a collective)."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, value)
        return out

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (plain data) on every rank: a decision made once (a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, what: str, value: Any) -> None:
        """Every rank must hold the same `value`, else all ranks raise the same error."""
        if self.world_size == 1:
            return
        values: list[Any] = [None] * self.world_size
        td.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise RunError(
                f"the ranks disagree on the {what} ({listing}); every rank must see the same "
                "files and run the same software"
            )

    def all_ok(self, fn: Callable[[], Any], *, patient: bool = False) -> Any:
        """Run `fn` on every rank; if it fails on any rank, raise that error on all of them.

        The failing rank re-raises its own exception; the others raise a RunError naming the
        first failing rank and its message, so every rank exits the same way. `patient`:
        `fn` may take long on some ranks (a snapshot write on rank 0): the others wait for
        it up to the write timeout, not the process group's.
        """
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            error = err
        if self.world_size > 1:
            reports: list[Any] = [None] * self.world_size
            group = self.patient if patient else None
            td.all_gather_object(reports, None if error is None else str(error), group=group)
            failed = [(r, m) for r, m in enumerate(reports) if m is not None]
            if failed and error is None:
                rank, message = failed[0]
                raise RunError(f"on rank {rank}: {message}")
        if error is not None:
            raise error
        return result


def init() -> Context:
    """Join the torchrun job if there is one (`backend` says with what)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    if not td.is_initialized():
        timeout = collective_timeout()
        store = _store(timeout)
        td.init_process_group(
            backend=backend(),
            timeout=datetime.timedelta(seconds=timeout),
            store=store,
            rank=int(os.environ["RANK"]) if store is not None else -1,
            world_size=world_size if store is not None else -1,
        )
    write_timeout = float(os.environ.get(WRITE_TIMEOUT_ENV, DEFAULT_WRITE_TIMEOUT_S))
    return Context(
        world_size=td.get_world_size(),
        rank=td.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        patient=td.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=write_timeout)
        ),  # every rank: a collective
    )


def collective_timeout() -> float:
    """Seconds a collective waits for the other ranks (`FUNCTRAIN_DIST_TIMEOUT`)."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def backend() -> str:
    """The process group's backends: gloo for CPU tensors and, where CUDA is present, NCCL
    for CUDA tensors. The group is made before the recipe is read (the ranks agree on it
    through the group), so both are named; a CUDA tensor is what picks NCCL, and NCCL
    makes its communicator at its first collective: a `device: cpu` run on a GPU machine
    never has one, and agreement, barriers and object collectives stay on gloo."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _store(timeout: float) -> td.Store | None:
    """Under torchrun's shared agent store (every launch: `TORCHELASTIC_RESTART_COUNT` is
    0 at first), keys of this attempt's own. After a restart (`--max-restarts`, an elastic
    job) the store still holds the addresses the dead workers published, under the same
    keys, and a new gloo group would connect to them and fail. None (torch's default)
    outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = td.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return td.PrefixStore(f"functrain/attempt_{attempt}/", agent)


def peer_failure(err: BaseException) -> str | None:
    """A one-line explanation if `err` is a collective that failed because a rank is gone.

    gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer", "Timed
    out"), NCCL as a DistBackendError: both only while a process group is up.
    """
    if not (td.is_initialized() and td.get_world_size() > 1 and isinstance(err, RuntimeError)):
        return None
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, td.DistError) and not any(w in text for w in ("gloo", "NCCL")):
        return None
    return (
        f"a collective failed: another rank died, hung or timed out ({text[:300]}). "
        "The newest snapshot is intact: continue with `functrain resume RECIPE --from latest`"
    )


def close() -> None:
    """Destroy the process groups, after collecting the garbage that may still hold them.

    An FSDP2 model's reference cycles keep DTensors, and through their mesh a gloo group,
    alive until interpreter shutdown, where tearing them down sometimes aborted the process
    ("terminate called without an active exception", 3 of 14 three-rank runs): collect them
    while the interpreter and the group are still whole.
    """
    if td.is_initialized():
        gc.collect()
        td.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a torchrun worker with `code`, without the interpreter's teardown.

    `destroy_process_group` does not end a gloo group that DTensor's sharding caches still
    reach (through a DeviceMesh, which holds its groups): its threads run on, and
    destroying it during interpreter shutdown, rarely, aborted a three-rank FSDP run that
    had finished ("terminate called without an active exception", exit -6: once in a CI
    run, not in 40 runs here).
    So do what shutdown does for Python code, in its order (join non-daemon threads and
    their exit hooks, such as a snapshot write's; run `atexit` functions; flush the
    streams) and skip the rest, the C++ destructors included.
    """
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
