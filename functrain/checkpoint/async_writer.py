"""Async snapshots: training stalls only while the state is copied to host memory.

`AsyncWriter.save` copies (stages) the tensors into a host buffer, then returns; a
background thread writes that copy with `functrain.checkpoint.save`. The copy is finished
before `save` returns, so a donated step that updates the state in place right after can
never change what is being written.

    with AsyncWriter() as writer:
        for ...:
            writer.check()                                  # a failed write stops the run here
            state = step(state, batch)
            writer.save(f"runs/a/state_{n}", state.tensors(), {"step": n})
    # leaving the block waits for the last write and raises its error, if any

Rules: at most one write is in flight (a new `save` first waits for the previous one); a
write's error is raised by the next call into the writer (`check`, `save`,
`wait_until_finished`, `close`); `on_done(path)` runs on the writer thread after the
snapshot is published (retention belongs there). Never call a torch.distributed collective
from `on_done`: it can deadlock against the collectives of the training step. (The sharded
writer, `functrain.checkpoint.dcp.async_writer`, runs its collectives on a process group of its own.)
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase

from functrain.checkpoint import raw

__all__ = ["AsyncWriter", "ClosedOnExit"]

OnDone = Callable[[Path], None]


_Closing = TypeVar("_Closing", bound="ClosedOnExit")


class ClosedOnExit:
    """`with obj:` calls `obj.close()` on the way out, which waits for a write in flight; the
    error close raises must not hide one already on its way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise


class AsyncWriter(ClosedOnExit):
    """Writes snapshots on a background thread from a reused host staging buffer.

    The staging buffer (one host copy of the state) is allocated at the first `save` and
    reused while the state keeps its structure, shapes and dtypes; `close` frees it.
    """

    def __init__(self, write: Callable[..., Path] | None = None) -> None:
        """`write(path, tensors, meta) -> path` publishes a staged copy: `checkpoint.save`
        (None), or for a sharded state `functrain.checkpoint.dcp.async_writer(sharding)`."""
        self._save = write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staged: TensorDict | None = None
        self._signature: tuple | None = None
        self._closed = False
        self._hooked = False  # the exit hook that lets a write in flight finish

    # ---------------------------------------------------------------- public API

    def save(
        self,
        path: str | os.PathLike,
        tensors: TensorDictBase,
        meta: Mapping[str, Any],
        on_done: OnDone | None = None,
    ) -> None:
        """Stage `tensors` into host memory, then write them as snapshot `path` in the background.

        Waits first for a write still in flight (and raises its error). When this returns,
        `tensors` may be changed freely: the write reads only the staged copy.
        """
        if self._closed:
            raise RuntimeError("AsyncWriter.save after close(); create a new AsyncWriter")
        self.wait_until_finished()
        meta = copy.deepcopy(dict(meta))  # the caller may change its dict while we write
        staged, ready = self._stage(tensors)
        self._thread = threading.Thread(
            target=self._write,
            args=(Path(path), staged, meta, ready, on_done),
            name="functrain-async-save",
            daemon=False,  # and `_finish_at_exit` lets it finish if nobody calls close()
        )
        if not self._hooked:  # once per writer, holding it weakly: no registry of writers
            threading._register_atexit(functools.partial(_finish_at_exit, weakref.ref(self)))
            self._hooked = True
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a finished write, once; return at once otherwise (never blocks)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def wait_until_finished(self) -> None:
        """Block until no write is in flight; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    @property
    def failed(self) -> bool:
        """Whether a finished write failed and `check` would raise (never blocks, raises nothing)."""
        return self._error is not None

    @property
    def busy(self) -> bool:
        """Whether a write is in flight now."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Wait for the write in flight, free the staging buffer, raise a pending error."""
        self._closed = True
        self._staged = self._signature = None
        self.wait_until_finished()

    # ---------------------------------------------------------------- the two halves

    def _stage(self, tensors: TensorDictBase) -> tuple[TensorDict, list[torch.cuda.Event]]:
        """Copy every leaf into the staging buffer; events mark device->host copies done."""
        if not isinstance(tensors, TensorDictBase):
            raise TypeError(f"tensors must be a TensorDict, got {type(tensors).__name__}")
        signature = _signature(tensors)
        if signature != self._signature or self._staged is None:
            self._staged = self._signature = None  # free the old buffer before allocating
            self._staged = tensors.apply(_host_like, device="cpu")
            self._signature = signature
        keys = [key for key, leaf in signature if leaf is not None]
        src = [tensors.get(k) for k in keys]
        dst = [self._staged.get(k) for k in keys]
        with torch.no_grad():
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=s.is_cuda)
        ready = []
        for device in {s.device for s in src if s.is_cuda}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))  # later steps queue behind the copy
            ready.append(event)
        return self._staged, ready

    def _write(
        self,
        path: Path,
        staged: TensorDict,
        meta: dict[str, Any],
        ready: list[torch.cuda.Event],
        on_done: OnDone | None,
    ) -> None:
        try:
            for event in ready:
                event.synchronize()  # the host copy of a device tensor has landed
            published = (self._save or raw.save)(path, staged, meta)
            if on_done is not None:
                on_done(published)
        except BaseException as e:  # handed to the training thread by check()
            self._error = e


def _signature(tensors: TensorDictBase) -> tuple:
    """Every key (sub-dicts too), with shape, dtype and device for leaves: when to reallocate."""
    return tuple(
        (k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else None)
        for k, v in tensors.items(include_nested=True)
    )


def _host_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized host tensor to copy `t` into (page-locked when `t` is on a GPU)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)


def _finish_at_exit(ref: weakref.ref[AsyncWriter]) -> None:
    """Let a write in flight finish when the interpreter exits without `close()`.

    `checkpoint.save` checksums on a thread pool, and pools refuse work once the interpreter
    starts to exit, before non-daemon threads are joined: so wait in threading's exit hook,
    which runs earlier (hooks run last-registered first, and concurrent.futures registered
    its own when `checkpoint` was imported)."""
    writer = ref()
    if writer is None:
        return
    try:
        writer.close()
    except Exception as e:  # nobody is left to raise it to
        print(f"functrain: an async snapshot failed: {e}", file=sys.stderr, flush=True)
