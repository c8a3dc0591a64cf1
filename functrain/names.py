"""Component paths that moved between versions, and where they live now.

Recipes name components by dotted path (`functrain.steps.forward_backward`), and every
manifest records the recipe it ran. So a path that moves keeps working: a recipe that
spells the old path is read with the new one (and told so once), and a manifest's recipe
is compared in the new spelling, so resuming an old snapshot sees no change.

>>> current("functrain.step.forward_backward")
('functrain.steps.forward_backward', 'functrain.step.')
>>> current("functrain.optim.adamw")
('functrain.optim.adamw', None)
"""

from __future__ import annotations

from typing import Any

__all__ = ["MOVED", "current", "current_plain"]

#: (old prefix, new prefix): `functrain.step` shadowed the exported `step` function;
#: `functrain/dist/` was skipped by tools that take `dist/` for build output.
MOVED = (
    ("functrain.step.", "functrain.steps."),
    ("functrain.dist.", "functrain.distributed."),
)


def current(target: str) -> tuple[str, str | None]:
    """(`target` in today's spelling, the old prefix it had or None)."""
    for old, new in MOVED:
        if target.startswith(old):
            return new + target[len(old) :], old
    return target, None


def current_plain(value: Any) -> Any:
    """Plain recipe data (a manifest's) with every `_component_` path in today's spelling."""
    if isinstance(value, dict):
        return {
            k: current(v)[0] if k == "_component_" and isinstance(v, str) else current_plain(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [current_plain(v) for v in value]
    return value
