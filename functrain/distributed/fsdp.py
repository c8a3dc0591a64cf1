"""FSDP2 under torchrun: each rank holds one dim-0 shard of the params and optimizer state.

`shard(model, world_size)` applies `torch.distributed.fsdp.fully_shard` to every block of
the model's `nn.ModuleList`s (bottom-up) and then to the root. `Sharding.of(model)` reads
the result into an implementation of the core's `functrain.parallel.Sharding` protocol;
`create(model, ..., sharding=Sharding.of(model))` then keeps in the state plain tensors:
this rank's rows of every param, and of every optimizer or EMA leaf shaped like one. The
module itself is a workspace: before a forward pass the state's shards are copied into it
(one copy of 1/N of the params), FSDP gathers them, and after backward FSDP reduce-scatters
the gradients, which the step takes back as plain local tensors. Everything after that
(clipping, the optimizer, EMA) runs on shards. With canonical micro-batches
(`Sharding.of(model, canonical=True)`) FSDP2 gathers but does not reduce: each
micro-batch's whole gradients go to the canonical tree (`whole_backward`), reduced over
ranks as under DDP, and the optimizer takes this rank's rows (`local_grads`).

Snapshots of a sharded state go through torch.distributed.checkpoint
(`functrain.checkpoint.dcp`): `views` wraps each shard as a DTensor view without copying,
so each rank writes its own rows and any number of ranks can read them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.distributed as td
from tensordict import TensorDict
from torch import nn

from functrain.errors import ConfigError
from functrain.parallel import module_buffers
from functrain.recompute import blocks

# torch.distributed.fsdp, .tensor and .device_mesh are imported where first used: together
# they add ~0.25 s to every CLI start, and only `parallel: fsdp` runs need them.

#: The saved entries that may hold shards: leaves there that mirror a param are sharded.
SHARDED_ENTRIES = ("params", "frozen", "opt", "ema")

Key = tuple[str, ...]


@attrs.frozen
class Piece:
    """One param's sharding: its global shape and stride, and this rank's rows of dim 0."""

    shape: torch.Size
    stride: tuple[int, ...]
    start: int
    rows: int

    @property
    def local_shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.shape[1:]))


@attrs.frozen(eq=False)
class Sharding:
    """The FSDP2-sharded module of a state and where this rank's rows of each param lie."""

    module: nn.Module
    mesh: object  # a 1-D torch.distributed DeviceMesh
    pieces: dict[Key, Piece]
    #: Canonical micro-batches: FSDP2 gathers params but does not reduce gradients; each
    #: micro-batch's whole gradients go to the canonical tree (`whole_backward`), and the
    #: step keeps them whole until the optimizer takes this rank's rows (`local_grads`).
    canonical: bool = False
    _unreduced: dict[Key, Any] = attrs.field(factory=dict)  # key -> FSDP2's FSDPParam

    @classmethod
    def of(cls, module: nn.Module, *, canonical: bool = False) -> Sharding:
        """Read the sharding off a module that `fully_shard` has been applied to; with
        `canonical`, switch its gradient reduction off (`whole_backward` reads them)."""
        pieces, mesh = {}, None
        for name, p in module.named_parameters():
            spec = getattr(p, "placements", None)
            if spec is None or len(spec) != 1 or getattr(spec[0], "dim", None) != 0:
                raise ValueError(
                    f"param {name!r} is not sharded on dim 0 by fully_shard (placements "
                    f"{spec}); apply fully_shard to the model and to every submodule holding "
                    "params, or use functrain.distributed.fsdp.shard(model)"
                )
            mesh = p.device_mesh
            n, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
            start = min(rank * -(-n // world), n)
            pieces[tuple(name.split("."))] = Piece(
                p.shape, p.stride(), start, p.to_local().shape[0]
            )
        if not canonical:
            return cls(module=module, mesh=mesh, pieces=pieces)
        module.set_requires_gradient_sync(False)  # FSDP2 keeps each backward's whole grads
        return cls(module, mesh, pieces, canonical=True, unreduced=_fsdp_params(module))

    def split(self, model: nn.Module, device: Any = None) -> tuple[TensorDict, TensorDict]:
        """A copy of this rank's shard of every param, and of the buffers (the state's at
        step 0). The sharded module stays where `shard` put it."""
        named = dict(self.module.named_parameters())
        out = {k: named[".".join(k)].to_local().detach().clone() for k in self.pieces}
        params = TensorDict(out, batch_size=[]).apply(lambda t: t.requires_grad_(True))
        return params, module_buffers(self.module)

    @contextlib.contextmanager
    def bind(self, model: nn.Module, params: TensorDict) -> Iterator[nn.Module]:
        """The module with `params` (this rank's shards) copied in, resharded on exit."""
        _reshard(self.module)
        keys, values = zip(*_leaves(params), strict=True)
        with torch.no_grad():
            torch._foreach_copy_([p.to_local() for p in self._params(keys)], list(values))
        try:
            yield self.module
        finally:
            _reshard(self.module)

    def backward(
        self, loss: torch.Tensor, params: list[torch.Tensor], acc: None, last: bool = False
    ) -> None:
        """FSDP2 reduce-scatters (and accumulates) into the module's own `.grad`."""
        loss.backward()

    def gradients(self, params: TensorDict, acc: None = None) -> list[torch.Tensor]:
        """The reduce-scattered gradients as plain shards, in the leaf order of `params`.

        The module's gradients are cleared; a param the loss did not use gets zeros.
        """
        grads, leaves = [], _leaves(params)
        for (_, value), p in zip(leaves, self._params(k for k, _ in leaves), strict=True):
            grads.append(p.grad.to_local() if p.grad is not None else torch.zeros_like(value))
            p.grad = None
        return grads

    def whole_backward(
        self, loss: torch.Tensor, params: TensorDict, tree: object = None
    ) -> list[torch.Tensor]:
        """One micro-batch's whole gradients, in the leaf order of `params`, taken from
        FSDP2 before any reduction (canonical mode: the tree and its scatter reduce them).
        A param the loss did not use gets zeros."""
        if not self.canonical:
            raise ConfigError(
                "forward_backward(micro_batch_size=...) under FSDP2 needs the sharding in "
                "canonical mode: functrain.distributed.fsdp.Sharding.of(model, "
                "canonical=True), with shard(model, compute_dtype=None) (autocast casts)"
            )
        loss.backward()
        out = []
        for key, shard in _leaves(params):
            fp = self._unreduced[key]
            # Mixed precision converts a backward's grads to the reduce dtype, which the
            # next backward would add to: taken out, every micro-batch's stay its own.
            grad, fp.unsharded_accumulated_grad = fp.unsharded_accumulated_grad, None
            unsharded = getattr(fp, "_unsharded_param", None)  # none before a first gather
            if grad is None and unsharded is not None:
                grad = unsharded.grad
            if unsharded is not None:
                unsharded.grad = None
            if grad is None:
                grad = torch.zeros(self.pieces[key].shape, dtype=shard.dtype, device=shard.device)
            out.append(grad)
        return out

    def local_grads(self, grads: TensorDict) -> TensorDict:
        """This rank's rows of whole (canonical) gradients; reduce-scattered ones as they are."""
        if not self.canonical:
            return grads
        rows = {}
        for key, g in _leaves(grads):
            p = self.pieces[key]
            rows[key] = g.narrow(0, p.start, p.rows)
        return TensorDict(rows, batch_size=[])

    def _params(self, keys) -> list[nn.Parameter]:
        named = dict(self.module.named_parameters())
        return [named[".".join(k)] for k in keys]

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The L2 norm over all ranks from this rank's L2 norm (a collective); canonical,
        the gradients are whole on every rank and `local` is already that norm."""
        if self.canonical:
            return local
        total = local.square()
        td.all_reduce(total, op=td.ReduceOp.SUM, group=self.mesh.get_group())
        return total.sqrt()

    def any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """The flag's maximum over ranks (a collective)."""
        out = flag.clone()
        td.all_reduce(out, op=td.ReduceOp.MAX, group=self.mesh.get_group())
        return out

    def piece(self, entry: str, key: Key, shape: torch.Size, whole: bool = False) -> Piece | None:
        """The sharding of the leaf `entry/key` if it mirrors a param, else None.

        It mirrors one when its key ends with the param's key (optimizer state nests a
        params-shaped tree under keys of its own: `opt/mu/...`) and its shape is the param's
        local shape (or, with `whole`, the param's whole shape).
        """
        if entry not in SHARDED_ENTRIES:
            return None
        for i in range(len(key)):
            found = self.pieces.get(key[i:])
            if found is not None and tuple(shape) == tuple(
                found.shape if whole else found.local_shape
            ):
                return found
        return None

    def localize(self, tensors: TensorDict) -> TensorDict:
        """`tensors` (whole, e.g. from an unsharded snapshot) with this rank's rows of each shard."""

        def local(entry: str, key: Key, t: torch.Tensor) -> torch.Tensor:
            p = self.piece(entry, key, t.shape, whole=True)
            return t if p is None else t.narrow(0, p.start, p.rows)

        return _map(tensors, local)

    def global_meta(self, tensors: TensorDict) -> TensorDict:
        """Meta tensors with the whole shapes of `tensors`, a sharded state's entries."""

        def whole(entry: str, key: Key, t: torch.Tensor) -> torch.Tensor:
            p = self.piece(entry, key, t.shape)
            return torch.empty(p.shape if p else t.shape, dtype=t.dtype, device="meta")

        return _map(tensors, whole)

    def views(self, tensors: TensorDict, mesh: Any = None) -> dict[str, torch.Tensor]:
        """`entry/key` -> a DTensor view of each shard (no copy), the plain tensor otherwise.

        `mesh` (default: the model's) must span the same ranks; its device type must be the
        tensors' (DTensor moves a shard to its mesh's device).
        """
        from torch.distributed.tensor import DTensor, Shard

        out = {}
        for key, t in _leaves(tensors):
            p = self.piece(key[0], key[1:], t.shape)
            if p is not None:
                t = DTensor.from_local(
                    t.detach(),
                    mesh or self.mesh,
                    [Shard(0)],
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride,
                )
            out["/".join(key)] = t
        return out


def shard(
    model: nn.Module,
    *,
    world_size: int | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply FSDP2 to `model` in place: each block of its ModuleLists, then the root.

    Needs an initialized process group; the mesh spans all `world_size` ranks. With a
    `compute_dtype` (bf16, fp16) FSDP gathers the params in it for the forward pass and
    reduce-scatters the gradients in float32; the shards stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world_size = world_size or td.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    policy = MixedPrecisionPolicy()  # float32 throughout
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in reversed(blocks(model)):  # bottom-up: nested blocks before the blocks holding them
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _fsdp_params(module: nn.Module) -> dict[Key, Any]:
    """Param key -> the FSDP2 object that holds its unsharded gradient after a backward
    without reduction. FSDP2 has no public reader of those: this reads its internals, and
    names the torch that lacks them."""
    from torch.distributed.fsdp import FSDPModule

    prefixes = {id(m): name for name, m in module.named_modules()}
    out = {}
    try:
        for m in module.modules():
            if not isinstance(m, FSDPModule):
                continue
            state = m._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch < 2.10: at most one group per module
                groups = [g for g in [state._fsdp_param_group] if g is not None]
            for group in groups:
                for fp in group.fsdp_params:
                    info = fp._module_info
                    prefix = prefixes[id(info.module)]
                    key = (*prefix.split("."), info.param_name) if prefix else (info.param_name,)
                    fp.unsharded_accumulated_grad  # noqa: B018 -- present in this torch?
                    out[key] = fp
    except AttributeError as err:
        raise ConfigError(
            f"canonical micro-batches (micro_batch_size) with parallel: fsdp read FSDP2's "
            f"unreduced gradients, which torch {torch.__version__} keeps elsewhere ({err}); "
            "it is tested with torch 2.13. Use parallel: ddp, or micro_batches instead of "
            "micro_batch_size"
        ) from err
    return out


def _reshard(module: nn.Module) -> None:
    """Free the gathered params of every FSDP group (the root keeps them after a no-grad forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _leaves(tensors: TensorDict) -> list[tuple[Key, torch.Tensor]]:
    return [
        ((k,) if isinstance(k, str) else k, t)
        for k, t in tensors.items(include_nested=True, leaves_only=True)
    ]


def _map(tensors: TensorDict, fn) -> TensorDict:
    """`tensors` with each leaf replaced by `fn(entry, key_below_entry, leaf)`, entries in order."""
    out = {}
    for entry, value in tensors.items():
        if isinstance(value, torch.Tensor):
            out[entry] = fn(entry, (), value)
        else:
            out[entry] = _map_entry(entry, value, fn)
    return TensorDict(out, batch_size=[])


def _map_entry(entry: str, td: TensorDict, fn) -> TensorDict:
    out = td.empty(recurse=True).clear_device_()  # the sub-dicts, in order; any device
    for key, t in _leaves(td):
        out[key] = fn(entry, key, t)
    return out
