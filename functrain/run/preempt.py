"""Stop a run cleanly on a signal: finish the step, write a snapshot, exit `EXIT_PREEMPTED`.

SIGTERM (what schedulers and `kill` send), a first Ctrl-C (SIGINT) and the recipe's
`checkpoint.signal` (e.g. SIGUSR1, which SLURM can send ahead of a time limit) only set a
flag; the loop checks it between steps, so a step and a snapshot are never cut in half.
A second Ctrl-C aborts at once (KeyboardInterrupt, exit 130): nothing half-written is ever
published, but the steps since the last snapshot are lost.

    with Preemption("SIGUSR1") as stop:
        ...  # between steps: if stop.requested is not None, snapshot and leave the loop
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from functrain.checkpoint import snapshot_path

__all__ = ["EXIT_ABORTED", "EXIT_PREEMPTED", "Preemption", "continue_hint", "stopped_message"]

_Handler = Callable[[int, FrameType | None], Any] | int | None

#: Exit status after a signal asked the run to stop and its snapshot was written (128 + SIGTERM).
EXIT_PREEMPTED = 143
#: Exit status after a second Ctrl-C aborted the run without a final snapshot (128 + SIGINT).
EXIT_ABORTED = 130


class Preemption:
    """Handlers for SIGTERM, SIGINT and `extra` while the `with` block runs; old ones after.

    `requested` is the name of the first signal received (None until then). Outside the
    main thread signal handlers cannot be installed, and this does nothing.
    """

    def __init__(self, extra: str | None = None) -> None:
        self.requested: str | None = None
        self._signals = [signal.SIGTERM, signal.SIGINT]
        if extra is not None:
            self._signals.append(signal.Signals[extra])
        self._old: dict[int, _Handler] = {}  # what signal.signal returned, to put back

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: the loop acts between steps. A second Ctrl-C means "now".
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name


def stopped_message(signal_name: str | None, run: Path, step: int, recipe: str = "<recipe>") -> str:
    """What a run stopped by a signal says on stderr before exiting `EXIT_PREEMPTED`;
    `recipe` is the recipe (and overrides) the resume command names."""
    by = signal_name or "a signal to another rank"
    return f"functrain: stopped by {by} after step {step}; " + continue_hint(
        run, step, recipe, f" (exit status {EXIT_PREEMPTED})"
    )


def continue_hint(run: Path, step: int, recipe: str, tail: str = "") -> str:
    """`snapshot ... written. Continue exactly with: functrain resume ...`."""
    return (
        f"snapshot {snapshot_path(run, step)} written. Continue exactly with: "
        f"functrain resume {recipe} --from latest{tail}"
    )
