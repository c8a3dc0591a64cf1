"""Build a model on the meta device, then make its tensors one at a time: bitwise what
building it eagerly on the CPU gives, without ever holding the whole model there.

    deferred = record(lambda: GPT(...))     # the constructor runs on meta: no memory
    shard(deferred.module)                  # e.g. FSDP2, still on meta
    deferred.module.to_empty(device=dev)    # this process's part, uninitialised
    with rng.seeded(seed):                  # as the eager build would be
        deferred.materialize(put)           # put(name, full): keep what this rank needs

`record` runs the constructor under the meta device and logs every aten op it runs (the
empty tensors, `uniform_`/`normal_` of each layer's own init, a model's re-init, buffers'
`arange`, ...). `materialize` replays the log on CPU tensors, in order, with the same RNG:
every random op draws what it drew in an eager build, so the values are the eager ones,
bit for bit. A storage lives only while its content can still be read: one overwritten
later before any read (a layer's default init that the model's own init replaces) is
drawn into and freed at once, and a param's or buffer's is handed to `put` at its last op
and freed. So the CPU holds about one param at a time, whatever the model's size.

A constructor that reads values (`.item()`), or makes CPU tensors of its own, cannot be
recorded: `record` raises `NotRecordable` (functrain's build then builds eagerly). A model
may also record fine and replay other values than an eager build would (one that inits
differently on meta, as `transformers` models do): so the build uses this only for a
class that says it `replays_on_meta`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["Deferred", "NotRecordable", "record"]

_aten = torch.ops.aten
#: In-place ops that overwrite every element of `self` without reading it.
_OVERWRITES = {
    _aten.normal_.default, _aten.uniform_.default, _aten.fill_.Scalar, _aten.zero_.default,
    _aten.bernoulli_.float, _aten.exponential_.default, _aten.log_normal_.default,
    _aten.cauchy_.default, _aten.geometric_.default, _aten.random_.default,
    getattr(_aten.random_, "from"), _aten.random_.to,
}  # fmt: skip


class NotRecordable(RuntimeError):
    """The constructor did something a meta-device recording cannot replay."""


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, Any, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(not t.is_meta for t in tensors):
            raise NotRecordable(f"{func} made or read a tensor that is not on the meta device")
        self.ops.append((func, args, kwargs, out))  # holds the meta tensors: keys stay unique
        return out


def record(make: Callable[[], nn.Module]) -> Deferred:
    """`make()` run on the meta device, every aten op logged (see the module docstring)."""
    recorder = _Recorder()
    try:
        with torch.device("meta"), recorder:
            module = make()
    except NotRecordable:
        raise
    except (NotImplementedError, RuntimeError) as err:  # e.g. `.item()` of a meta tensor
        raise NotRecordable(f"the constructor cannot run on the meta device: {err}") from err
    named = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        named.setdefault(_key(t), []).append((name, t.detach()))
    return Deferred(module, recorder.ops, named)


class Deferred:
    """A module built on meta, and the log that makes its tensors (`record`)."""

    def __init__(self, module: nn.Module, ops: list, named: dict[int, list]) -> None:
        self.module, self._ops, self._named = module, ops, named

    def materialize(self, put: Callable[[str, torch.Tensor], None]) -> None:
        """Replay the log on the CPU; `put(name, value)` for each param and buffer, with its
        eager value, as soon as it is final (then the CPU copy is freed). Seed torch's RNG
        as the eager build was."""
        events = self._events()
        real: dict[int, torch.UntypedStorage] = {}

        def view(t: torch.Tensor) -> torch.Tensor:
            storage = real[_key(t)]
            return torch.empty((), dtype=t.dtype).set_(
                storage, t.storage_offset(), t.size(), t.stride()
            )

        def here(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return view(x)
            return torch.device("cpu") if isinstance(x, torch.device) else x

        for i, (func, args, kwargs, out) in enumerate(self._ops):
            for key, nbytes, kind in events.touched[i]:
                if key not in real:
                    if kind == "use":
                        raise RuntimeError(f"replay: storage read after it was freed ({func})")
                    real[key] = torch.UntypedStorage(nbytes)
            with torch.no_grad():
                result = func(*tree_map(here, args), **tree_map(here, kwargs))
            for made, t in zip(
                tree_flatten(result)[0], tree_flatten(out)[0], strict=True
            ):  # a new storage's contents are the op's output
                if isinstance(t, torch.Tensor) and _key(t) in events.created.get(i, ()):
                    real[_key(t)] = made.untyped_storage()
            for key, _, _ in events.touched[i]:
                if events.last[key] == i:
                    for name, meta in self._named.get(key, ()):
                        put(name, view(meta))
                    real.pop(key, None)
                elif events.next_overwrites(key, i):
                    real.pop(key, None)  # what it holds is never read: drawn, then gone

    def _events(self) -> _Events:
        ev = _Events()
        for i, (func, args, kwargs, out) in enumerate(self._ops):
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            seen = {_key(t) for t in inputs}
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            created = {_key(t) for t in outputs if _key(t) not in seen}
            ev.created[i] = created
            touched = []
            for t in [*inputs, *outputs]:
                key = _key(t)
                if any(k == key for k, _, _ in touched):
                    continue
                whole = t.untyped_storage().nbytes()
                if key in created:
                    kind = "create"
                elif func in _OVERWRITES and t is args[0] and _covers(t):
                    kind = "overwrite"
                else:
                    kind = "use"
                touched.append((key, whole, kind))
                ev.add(key, i, kind)
            ev.touched.append(touched)
        return ev


def _covers(t: torch.Tensor) -> bool:
    return (
        t.storage_offset() == 0
        and t.is_contiguous()
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


class _Events:
    """Per storage, the ops that touch it, in order, and how."""

    def __init__(self) -> None:
        self.touched: list[list[tuple[int, int, str]]] = []
        self.created: dict[int, set[int]] = {}
        self.last: dict[int, int] = {}
        self._kinds: dict[int, list[tuple[int, str]]] = {}
        self._at: dict[tuple[int, int], int] = {}

    def add(self, key: int, i: int, kind: str) -> None:
        self._at[(key, i)] = len(self._kinds.setdefault(key, []))
        self._kinds[key].append((i, kind))
        self.last[key] = i

    def next_overwrites(self, key: int, i: int) -> bool:
        """Whether the next op on `key` after op `i` overwrites it whole (without reading)."""
        at = self._at[(key, i)] + 1
        kinds = self._kinds[key]
        return at < len(kinds) and kinds[at][1] == "overwrite"
