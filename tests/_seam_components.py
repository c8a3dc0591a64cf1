"""Step transforms that wrap `forward_backward`, for tests/test_seams.py to name from recipes
(tests/ on PYTHONPATH): one keeps the declarations, one hides them, one fails."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from functrain.optim import leaves
from functrain.steps import forward_backward
from functrain.transform import Transform


def declared_wrapper(micro_batches: int = 1, micro_batch_size: int | None = None) -> Transform:
    """`forward_backward` under another name, wrapped with `.wrap`: declarations kept."""
    inner = forward_backward(micro_batches, micro_batch_size=micro_batch_size)
    wrapped = inner.wrap(lambda apply, state, batch: apply(state, batch))
    return Transform(
        name="my_grads",
        apply=wrapped.apply,
        produces_grads=True,
        micro_batch_size=wrapped.micro_batch_size,
    )


def own_grads(micro_batches: int = 1) -> Transform:
    """Gradients made with `torch.autograd.grad` itself, the whole batch at once (it takes
    `micro_batches` and ignores it), not through the state's sharding: under DDP the
    reduction transform must still reduce them."""

    def apply(state, batch):
        with state.bind() as model:
            loss = state.static.loss(model, batch).float()
            grads = torch.autograd.grad(loss, leaves(state.params))
        keys = state.params.keys(include_nested=True, leaves_only=True)
        grads = TensorDict(dict(zip(keys, grads, strict=True)), batch_size=[])
        return state.replace(grads=grads, metrics=state.metrics.replace(loss=loss.detach()))

    return Transform(name="own_grads", apply=apply, produces_grads=True)


def hidden_wrapper(micro_batches: int = 1, micro_batch_size: int | None = None):
    """`forward_backward` inside a plain function: it says nothing of its gradients."""
    inner = forward_backward(micro_batches, micro_batch_size=micro_batch_size)

    def my_grads(state, batch):
        return inner(state, batch)

    return my_grads


def fail_at(step: int):
    """A transform that raises at `step` (after the optimizer has updated in place)."""

    def fail(state, batch):
        if int(state.step) + 1 == step:
            raise RuntimeError(f"injected failure at step {step}")
        return state

    return fail


def broken_model(**kwargs):
    """A component whose own code raises: the recipe's to fix, named by field and line."""
    raise ValueError(f"this model cannot be built with vocab_size={kwargs['vocab_size']}")


def add_batch_mean():
    """A user's transform that puts a metric of its own into the state: the mean input id."""

    def batch_mean(state, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["input_ids"]
        metrics = state.metrics.copy()  # shallow: the state's own tree is left as it was
        metrics.set("batch_mean", x.float().mean())
        return state.replace(metrics=metrics)

    return batch_mean


class _ListRows(torch.utils.data.Dataset):
    """Rows as an HF `datasets.Dataset` gives them before `with_format("torch")`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = [(i * 7 + j) % 256 for j in range(33)]
        return {"input_ids": ids[:-1], "labels": ids[1:]}


def list_rows(n: int = 64) -> dict:
    """A data.dataset whose samples hold Python lists."""
    return {"train": _ListRows(n), "val": _ListRows(16)}
