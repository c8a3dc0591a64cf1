"""One error hierarchy: what a user can fix, and everything else.

    FunctrainError
      UserError            a recipe, file, snapshot or argument the user gave cannot be used:
        RecipeError        the CLI prints its one-paragraph message and exits 2
        SnapshotError
        RunError
          MismatchError    a snapshot does not fit this run (`what`: structure, recipe, data,
                           init_from): the one resume plan's refusal
        BuildError
        DataError
        ConfigError        a value given to one of functrain's functions does not fit
        ComponentError     a component the recipe names could not be made, or its code
                           raised in the trial step (the message says where)
      ConsumedStateError   a donated state used again (a mistake in a custom loop)

Only these are shown as a paragraph without a traceback. Any other exception is a bug in
functrain and keeps its traceback: whether an error is the user's is decided by the class
functrain raises, never by the class of an exception it happened to catch. A user error raised because of another exception chains it (`raise ... from
err`), so the cause stays available to a debugger and to `FUNCTRAIN_DEBUG=1`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = [
    "ERROR_FILE_ENV",
    "error_record",
    "warn",
    "BuildError",
    "ComponentError",
    "ConfigError",
    "ConsumedStateError",
    "DataError",
    "FunctrainError",
    "MismatchError",
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


class MismatchError(RunError):
    """A snapshot does not fit this run; `what` says which check refused it ("structure",
    "recipe", "data" or "init_from"), for tools that act on it (`functrain check`)."""

    def __init__(self, message: str, *, what: str) -> None:
        super().__init__(message)
        self.what = what


class BuildError(UserError, ValueError):
    """The recipe validated but its parts do not fit together (e.g. batch vs world size)."""


class DataError(UserError, ValueError):
    """A data source or data argument the user gave cannot be used."""


class ConfigError(UserError, ValueError):
    """A value given to one of functrain's functions (a recipe's kwargs, a batch that does
    not split) does not fit; a ValueError too, for code that catches those."""


class ComponentError(UserError):
    """A component the recipe names (`field`, `target`) could not be made, or raised when
    its code ran in the trial step; the cause is chained and its location named."""


class ConsumedStateError(FunctrainError, RuntimeError):
    """A state donated to `step` was used again."""


#: Set to a path: the CLI also writes a user error there as one JSON object
#: (`error_record`), for tools that launch functrain and act on the kind of refusal
#: (`functrain check`), never on its words.
ERROR_FILE_ENV = "FUNCTRAIN_ERROR_FILE"


def error_record(err: UserError) -> dict:
    """A user error as plain data: `error` (its class), `what` (the resume check that
    refused, for a MismatchError) and `message`."""
    return {"error": type(err).__name__, "what": getattr(err, "what", None), "message": str(err)}


def size_text(n: int) -> str:
    """A byte count as a message shows it: `512 B`, `3.4 KiB`, `12.0 MiB`, `1.5 GiB`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def warn(message: str) -> None:
    """Say on stderr what the user should know but need not act on now."""
    print(f"functrain: warning: {message}", file=sys.stderr, flush=True)
