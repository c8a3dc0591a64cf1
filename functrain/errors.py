"""One error hierarchy: what a user can fix, and everything else.

    FunctrainError
      UserError            a recipe, file, snapshot or argument the user gave cannot be used:
        RecipeError        the CLI prints its one-paragraph message and exits 2
        SnapshotError
        RunError
        BuildError
        DataError
      ConsumedStateError   a donated state used again (a mistake in a custom loop)

Any other exception is a bug in functrain (or in a user's own component) and keeps its
traceback. A user error raised because of another exception chains it (`raise ... from
err`), so the cause stays available to a debugger and to `FUNCTRAIN_DEBUG=1`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = [
    "warn",
    "BuildError",
    "ConsumedStateError",
    "DataError",
    "FunctrainError",
    "RecipeError",
    "RunError",
    "SnapshotError",
    "UserError",
]


class FunctrainError(Exception):
    """The base of every error functrain raises on purpose."""


class UserError(FunctrainError):
    """Something the user gave cannot be used; the message says what and what to do."""


class RecipeError(UserError):
    """A recipe that cannot run; `problems` holds one "dotted.key: what; what is allowed" each."""

    def __init__(self, problems: Sequence[str], source: str = "<recipe>") -> None:
        super().__init__(list(problems), source)
        self.problems: list[str] = list(problems)
        self.source = source

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'' if n == 1 else 's'} in the recipe:"
        return head + "".join(f"\n  - {p}" for p in self.problems)


class SnapshotError(UserError):
    """A snapshot is missing, incomplete, corrupt or unreadable; the message names the file."""


class RunError(UserError):
    """A run directory or resume request that cannot be honoured; the message says what to do."""


class BuildError(UserError, ValueError):
    """The recipe validated but its parts do not fit together (e.g. batch vs world size)."""


class DataError(UserError, ValueError):
    """A data source or data argument the user gave cannot be used."""


class ConsumedStateError(FunctrainError, RuntimeError):
    """A state donated to `step` was used again."""


def warn(message: str) -> None:
    """Say on stderr what the user should know but need not act on now."""
    print(f"functrain: warning: {message}", file=sys.stderr, flush=True)
