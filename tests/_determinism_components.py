"""A model for tests/test_determinism.py to name from recipes (tests/ on PYTHONPATH): the
tiny GPT, plus one op that has no deterministic kernel (`put_` with a repeated index)."""

from __future__ import annotations

import torch

from functrain.models import GPT


class PutGPT(GPT):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = super().forward(idx)
        bump = torch.zeros(2, device=logits.device)
        bump.put_(torch.tensor([0, 0], device=logits.device), torch.ones(2, device=logits.device))
        return logits + bump[1]  # adds 0: the bits of the plain GPT


class ReadsOnInit(torch.nn.Module):
    """Says it replays on meta, but its constructor reads a value: cannot be recorded."""

    replays_on_meta = True

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.top = int(self.w.abs().argmax())


class MyGPT(GPT):
    """A subclass of a model that replays on meta, which does not say so itself."""
