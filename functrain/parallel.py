"""What the pure core knows of parallel training: where a process stands, and a protocol
through which a sharded state plugs into the step.

The core never imports `torch.distributed`. A state holds its `Placement` (world size and
rank: data, no collectives) and a `Sharding`: how params are bound into the model, how
gradients come out of backward, how a norm spans ranks, and how whole tensors (a
snapshot's) map onto this process's pieces. `UNSHARDED` is the single-process default: the
whole state on every rank, gradients from `torch.autograd.grad`. FSDP2 implements the same
protocol in `functrain.distributed.fsdp`, the way optax lets any gradient transformation be chained
without the chain knowing what it does.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch
from tensordict import TensorDict
from torch import nn

from functrain.errors import ConfigError
from functrain.optim import leaves

if TYPE_CHECKING:
    from functrain.canonical import TreeSum

__all__ = ["UNSHARDED", "Placement", "Sharding", "Unsharded", "module_buffers"]


@attrs.frozen
class Placement:
    """This process's place in the job: `world_size` processes, this one is `rank`."""

    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Sharding(Protocol):
    """How the state's params relate to the model and to the other ranks."""

    def split(self, model: nn.Module, device: torch.device | str) -> tuple[TensorDict, TensorDict]:
        """The state's params and buffers at step 0, taken from `model`, which becomes the
        workspace the state is bound into for each forward pass."""
        ...

    def bind(
        self, model: nn.Module, params: TensorDict
    ) -> contextlib.AbstractContextManager[object]:
        """Put `params` into `model` for the body of a `with` block. A state enters it
        twice, nested: for its trainable params, then for its frozen ones."""
        ...

    def backward(
        self,
        loss: torch.Tensor,
        params: list[torch.Tensor],
        acc: list[torch.Tensor] | None,
        last: bool = False,
    ) -> list[torch.Tensor] | None:
        """Backpropagate one micro-batch's `loss`, accumulating into `acc` (None at first).
        `last`: the step's last backward, whose gradients a sharding may average over ranks
        as they come (DDP's `Overlapped`, whose `take_reduced()` then tells the step's
        reduction transform to leave them)."""
        ...

    def gradients(self, params: TensorDict, acc: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The accumulated gradients, one per leaf of `params`, in its leaf order."""
        ...

    def whole_backward(
        self, loss: torch.Tensor, params: TensorDict, tree: TreeSum | None = None
    ) -> list[torch.Tensor] | None:
        """One canonical micro-batch's gradients of the whole params, in the leaf order of
        `params`, not reduced over ranks, for the caller to push into its tree. Given
        `tree` (the `TreeSum` this micro-batch completes), a sharding may instead close
        it a gradient at a time as backward makes them, reducing each over
        ranks in the canonical tree meanwhile, and returns None."""
        ...

    def local_grads(self, grads: TensorDict) -> TensorDict:
        """The step's gradients cut to this process's pieces of the params (canonical
        gradients stay whole until the optimizer takes its rows)."""
        ...

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The L2 norm of the whole gradients from `local`, that of the gradients this
        process holds."""
        ...

    def any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0/1 flag set where it is set on any rank (of values that may differ by rank)."""
        ...

    def localize(self, tensors: TensorDict) -> TensorDict:
        """Whole `tensors` (a snapshot's entries) cut to this process's pieces."""
        ...

    def global_meta(self, tensors: TensorDict) -> TensorDict:
        """A state's entries as tensors of their whole shapes (values need not be kept)."""
        ...

    def views(self, tensors: TensorDict) -> dict[str, torch.Tensor]:
        """`entry/key` -> each leaf of a state's entries, as a view of its whole tensor (under
        FSDP a DTensor, whose `full_tensor()` gathers it: a collective)."""
        ...


class Unsharded:
    """The whole state in this process: the `Sharding` of single-process and DDP runs."""

    def split(self, model: nn.Module, device: torch.device | str) -> tuple[TensorDict, TensorDict]:
        model.to(device)
        named = model.named_parameters()
        params = {k: p.detach().clone().requires_grad_(True) for k, p in named}
        out = TensorDict(params, batch_size=[]).unflatten_keys("."), module_buffers(model)
        tied = {k: v for k, v in aliases(model).items() if k != v and k not in params}
        model.to("meta")  # the skeleton holds no memory: the state's tensors are swapped in
        # Tied weights (`head.weight = emb.weight`): the state keeps one tensor, `bind` puts
        # it under every name (`to("meta")` has untied them in the skeleton anyway).
        model.__dict__["_functrain_tied"] = [
            (tuple(k.split(".")), tuple(v.split("."))) for k, v in tied.items() if v in params
        ]
        _refuse_use_outside_bind(model)
        return out

    def bind(
        self, model: nn.Module, params: TensorDict
    ) -> contextlib.AbstractContextManager[object]:
        tied = [  # of the weights in `params` (the trainable or the frozen ones)
            (alias, first)
            for alias, first in model.__dict__.get("_functrain_tied", [])
            if params.get(first, None) is not None
        ]
        if tied:
            params = params.copy()  # shallow: the same tensors, under the aliases too
            for alias, first in tied:
                params[alias] = params[first]
        return swapped_into(params, model)

    def backward(
        self,
        loss: torch.Tensor,
        params: list[torch.Tensor],
        acc: list[torch.Tensor] | None,
        last: bool = False,
    ) -> list[torch.Tensor]:
        check_scalar(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        check_used(grads)
        if acc is None:
            return list(grads)
        torch._foreach_add_(acc, grads)
        return acc

    def gradients(self, params: TensorDict, acc: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if acc is None:
            raise ValueError("no gradients: backward was never called (an empty batch?)")
        return acc

    def whole_backward(
        self, loss: torch.Tensor, params: TensorDict, tree: TreeSum | None = None
    ) -> list[torch.Tensor]:
        return self.backward(loss, leaves(params), None)

    def local_grads(self, grads: TensorDict) -> TensorDict:
        return grads

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        return flag  # the replicas hold the same values

    def localize(self, tensors: TensorDict) -> TensorDict:
        return tensors

    def global_meta(self, tensors: TensorDict) -> TensorDict:
        return tensors

    def views(self, tensors: TensorDict) -> dict[str, torch.Tensor]:
        return {"/".join(k): t for k, t in tensors.items(include_nested=True, leaves_only=True)}


UNSHARDED = Unsharded()


def check_scalar(loss: torch.Tensor) -> None:
    if loss.dim() != 0:
        raise ConfigError(
            f"the loss must be a scalar, got a tensor of shape {list(loss.shape)}: reduce "
            "it (mean) in the loss function"
        )


def check_used(grads: tuple[torch.Tensor | None, ...]) -> None:
    unused = sum(g is None for g in grads)
    if unused:
        raise ConfigError(
            f"{unused} trainable parameter(s) are not used by the loss (a pooler or head "
            "the task does not need?): freeze them (the recipe's freeze:, or "
            "requires_grad=False), or use them"
        )


def swapped_into(tensors: TensorDict, module: nn.Module) -> contextlib.AbstractContextManager:
    """`tensors.to_module(module)` as a `with` block that puts the module's own tensors back
    however it is left. (tensordict undoes the swap on an Exception only: a
    KeyboardInterrupt or SystemExit inside the block would end in its own RuntimeError,
    hiding the interrupt — a second Ctrl-C exiting 1, not 130.)"""
    return _Swapped(tensors.to_module(module))


class _Swapped:
    def __init__(self, swap: Any) -> None:
        self._swap = swap

    def __enter__(self) -> Any:
        return self._swap.__enter__()

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if kind is not None and not issubclass(kind, Exception):
            # undone as for an error, and the interrupt goes on up
            self._swap.__exit__(RuntimeError, RuntimeError("interrupted"), None)
        else:
            self._swap.__exit__(kind, error, tb)
        return False


def aliases(module: nn.Module) -> dict[str, str]:
    """Every name of every param and buffer -> the name the state keeps it under (the first,
    as `named_parameters()` gives it): tied weights (`head.weight = emb.weight`) share one."""
    first: dict[int, str] = {}
    out = {}
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for name, t in named:
        out[name] = first.setdefault(id(t), name)
    return out


TAKEN_OVER = (
    "this module was taken over by functrain.create: its params and buffers now live in "
    "the TrainState (the module holds meta tensors). Use `with state.bind() as model:` for "
    "a forward pass, `state.state_dict()` for its weights, or "
    "`functrain.load_into(fresh_module, state)` for a module of your own"
)


def _refuse_use_outside_bind(model: nn.Module) -> None:
    """Make a forward pass or `state_dict()` of the skeleton, outside `bind`, fail loudly
    instead of computing on (or returning) meta tensors."""

    def on_meta() -> bool:
        first = next(iter(model.parameters()), None)
        return first is not None and first.is_meta

    def forward(module: nn.Module, args: object) -> None:
        if torch.compiler.is_compiling():  # traced code runs inside bind; keep graphs whole
            return
        if on_meta():
            raise RuntimeError(TAKEN_OVER)

    def state_dict(module: nn.Module, sd: object, prefix: str, meta: object) -> None:
        if on_meta():
            raise RuntimeError(TAKEN_OVER)

    model.register_forward_pre_hook(forward)
    model.register_state_dict_post_hook(state_dict)


def module_buffers(model: nn.Module) -> TensorDict:
    """A copy of the module's buffers, nested like the module tree."""
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    return TensorDict(buffers, batch_size=[]).unflatten_keys(".")
