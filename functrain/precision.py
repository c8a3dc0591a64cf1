"""Mixed precision: the dtype the forward pass computes in, and fp16's dynamic loss scaling.

`Precision("bf16")` runs the loss under `torch.autocast` in bfloat16; params, gradients and
optimizer state stay float32 (the master copy), so only activations change dtype.
`Precision("fp16")` computes in float16 and adds dynamic loss scaling with the arithmetic of
`torch.amp.GradScaler`: the loss is multiplied by the scale before backward and the
gradients are divided by it after; a step whose gradients are not all finite is skipped and
the scale backs off, and after `growth_interval` finite steps in a row it grows.

The skip is a mask, not a branch: the update runs, and where the gradients were not finite
the params and optimizer state are put back from a copy, so the host never waits on the
device. The scale, the run of finite steps and the count of skipped steps are entries of
`state.stats` (`loss_scale`, `scale_growth`, `skipped_steps`), saved with the state, so a
resumed run goes on with the same scale.

The schedule and AdamW's bias corrections count `state.step`: every batch consumed,
skipped steps included (as a torch loop that calls `scheduler.step()` every iteration does;
`GradScaler` there also leaves AdamW's own step count behind on a skip, functrain does not).

>>> Precision("bf16").compute_dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib
from typing import Literal

import attrs
import torch

__all__ = ["NAMES", "Precision"]

#: The precisions a recipe may name, with the dtype the forward pass computes in.
NAMES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_name(inst: Precision, attribute: attrs.Attribute, value: str) -> None:
    if value not in NAMES:
        raise ValueError(f"precision must be one of {', '.join(NAMES)}, got {value!r}")


def _above(low: float, high: float | None = None):
    def check(inst: Precision, attribute: attrs.Attribute, value: float) -> None:
        if not (value > low and (high is None or value < high)):
            bounds = f"> {low}" if high is None else f"in ({low}, {high})"
            raise ValueError(f"{attribute.name} must be {bounds}, got {value!r}")

    return check


@attrs.frozen
class Precision:
    """How a step computes: `name` is `fp32`, `bf16` or `fp16`; the rest is fp16's loss
    scaling, with `GradScaler`'s defaults."""

    name: Literal["fp32", "bf16", "fp16"] = attrs.field(default="fp32", validator=_check_name)
    init_scale: float = attrs.field(default=2.0**16, kw_only=True, validator=_above(0.0))
    growth_factor: float = attrs.field(default=2.0, kw_only=True, validator=_above(1.0))
    backoff_factor: float = attrs.field(default=0.5, kw_only=True, validator=_above(0.0, 1.0))
    growth_interval: int = attrs.field(default=2000, kw_only=True, validator=_above(0))

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for float32."""
        return NAMES[self.name]

    @property
    def scaling(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """Where the forward pass runs: autocast to the compute dtype, or nothing for fp32."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def init_stats(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The loss scaler's entries of `state.stats` at step 0 (none without scaling)."""
        if not self.scaling:
            return {}
        return {
            "loss_scale": torch.full((), self.init_scale, dtype=torch.float32, device=device),
            "scale_growth": torch.zeros((), dtype=torch.int32, device=device),
            "skipped_steps": torch.zeros((), dtype=torch.int64, device=device),
        }

    def scale(self, loss: torch.Tensor, stats) -> torch.Tensor:
        """`loss` as backward should see it."""
        return loss * stats["loss_scale"] if self.scaling else loss

    def unscale_(self, grads: list[torch.Tensor], stats) -> None:
        """Divide the gradients of a scaled loss by the scale, in place."""
        if self.scaling:
            inv = stats["loss_scale"].double().reciprocal().float()  # as GradScaler does
            torch._foreach_mul_(grads, inv)

    def nonfinite(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """1.0 if any gradient holds an inf or a NaN, else 0.0 (a 0-d tensor, no host sync)."""
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        one = torch.ones((), dtype=torch.float32, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)  # x * 1.0 is x
        return found

    def update_(self, stats, found: torch.Tensor) -> None:
        """Back the scale off after a skipped step, grow it after a run of finite ones, and
        count the skip (GradScaler's `update`, in place on `stats`)."""
        torch._amp_update_scale_(
            stats["loss_scale"],
            stats["scale_growth"],
            found,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )
        stats["skipped_steps"].add_(found.to(torch.int64))


def keep_unless(skip: torch.Tensor, new: list[torch.Tensor], old: list[torch.Tensor]) -> None:
    """Where `skip` (a 0-d bool tensor) is true, put `old` back into `new`, in place."""
    for n, o in zip(new, old, strict=True):
        torch.where(skip, o, n, out=n)
