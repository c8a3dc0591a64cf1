"""Flags every rank must act on at the same step, agreed without stalling the loop.

A stop request (SIGTERM) or a failed snapshot write is seen by one rank; every rank must
stop, or settle the write, at the same step. Asking with a blocking all-reduce after every
step would make each step end in a host sync (on a GPU: the CPU can never run ahead, and
kernel launches leave gaps). So each step *posts* its flags in a non-blocking all-reduce on
a CPU (gloo) group of the agreement's own, and the answer is *read* `lag` steps later,
when it has long arrived; steps that sync anyway (log, eval, snapshot) read everything
posted so far. The read schedule depends on step numbers only, so every rank reads the
same posts at the same step and gets the same answer.

One process: no collective, no lag; the flags are the answer.
"""

from __future__ import annotations

import array
import datetime
from collections import deque

import torch
import torch.distributed as td

__all__ = ["LAG", "Agreement"]

#: Steps between posting a step's flags and acting on them (where no sync comes sooner):
#: a stop request waits at most this many more steps.
LAG = 2


class Agreement:
    """`post(step, *flags)` after every step, on every rank, with as many flags; it returns
    for each flag whether any rank raised it in a post now due (all False when none is)."""

    def __init__(self, world_size: int, lag: int = LAG, timeout: float | None = None) -> None:
        self.lag = lag
        # gloo on the CPU whatever the training backend: the flags live on the host, and
        # waiting for them never waits for a device
        wait = datetime.timedelta(seconds=timeout) if timeout is not None else None
        self._group = td.new_group(backend="gloo", timeout=wait) if world_size > 1 else None
        self._posted: deque[tuple[int, array.array, td.Work]] = deque()

    def post(self, step: int, *flags: bool, now: bool = False) -> tuple[bool, ...]:
        """Post this step's flags; the agreement of every post `lag` steps old or older, or
        with `now` (a step that syncs anyway), of every post so far, this one included."""
        if self._group is None:
            return flags
        values = array.array("i", [int(f) for f in flags])  # read back without a tensor op
        t = torch.frombuffer(values, dtype=torch.int32)
        work = td.all_reduce(t, op=td.ReduceOp.MAX, group=self._group, async_op=True)
        self._posted.append((step, values, work))
        return self._read(len(flags), step if now else step - self.lag)

    def drain(self) -> tuple[bool, ...] | None:
        """Wait for every post still out; their agreement (None if there was none). Call it
        before the loop ends normally, on every rank."""
        if not self._posted:
            return None
        return self._read(len(self._posted[0][1]), self._posted[-1][0])

    def _read(self, n: int, up_to: int) -> tuple[bool, ...]:
        raised = [False] * n
        while self._posted and self._posted[0][0] <= up_to:
            _, values, work = self._posted.popleft()
            work.wait()
            raised = [r or bool(v) for r, v in zip(raised, values, strict=True)]
        return tuple(raised)
