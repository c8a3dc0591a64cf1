"""A training setup with everything that makes resume hard, shared by the resume tests and
their worker process: dropout, batch norm, shuffling, gradient accumulation, clipping,
warmup+cosine, EMA, a dataset whose size does not divide into global batches."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import functrain as ft
from functrain import checkpoint
from functrain.data import make_loader
from functrain.losses import cross_entropy
from functrain.models import MLP
from functrain.schedule import warmup_cosine

BATCH = 16
SEED = 5
N_SAMPLES = 200  # 12 global batches per epoch, 8 samples dropped at each epoch's end


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(N_SAMPLES, 16, generator=g), torch.randint(0, 4, (N_SAMPLES,), generator=g)
    )


def fresh_state(total_steps: int) -> ft.TrainState:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(in_features=16, hidden=32, classes=4, depth=2, dropout=0.2)
    return ft.create(
        model,
        loss=cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
        schedule=warmup_cosine(5, total_steps),
        transforms=[
            ft.forward_backward(micro_batches=2),
            ft.clip_by_global_norm(1.0),
            ft.apply_optimizer(),
            ft.ema(0.9),
        ],
        seed=SEED,
    )


def train(state: ft.TrainState, until: int, num_workers: int) -> tuple[ft.TrainState, list[float]]:
    """Train to step `until`, the loader positioned from the state's cursor alone."""
    loader = make_loader(
        dataset(),
        batch_size=BATCH,
        seed=SEED,
        shuffle=True,
        start=int(state.data["samples"]),
        num_workers=num_workers,
    )
    losses = []
    batches = iter(loader)
    while int(state.step) < until:
        state = ft.step(state, next(batches))
        losses.append(state.metrics["loss"].item())
    return state, losses


def save(path, state: ft.TrainState) -> None:
    checkpoint.save(path, state.tensors(), {"step": int(state.step)})


def restore(path, total_steps: int) -> ft.TrainState:
    tensors, _ = checkpoint.load(path)
    return fresh_state(total_steps).load(tensors)
