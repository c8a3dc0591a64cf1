"""A dataset and a model that do not resume exactly, for `functrain check` to catch
(tests/test_check.py names them as `_component_` targets, with tests/ on PYTHONPATH)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from functrain.data import text_corpus
from functrain.models import GPT


class _Noisy(Dataset):
    """Byte blocks with one token replaced by a draw from torch's global RNG: a different
    sample for the same index once a process starts afresh (a resume)."""

    def __init__(self, inner: Dataset, fingerprinted: bool) -> None:
        self.inner = inner
        if fingerprinted:  # a user's content id: the fingerprint check then cannot see it
            self.fingerprint = lambda: "noisy"

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        x, y = self.inner[i]
        x = x.clone()
        x[0] = int(torch.randint(0, 256, ()))  # not seeded from i: the defect under test
        return x, y


def noisy_corpus(fingerprinted: bool = True, **kwargs):
    return {name: _Noisy(split, fingerprinted) for name, split in text_corpus(**kwargs).items()}


class CountingGPT(GPT):
    """A GPT whose output depends on a call counter kept on the module, outside the state."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(idx) * (1 + 0.01 * min(self.calls, 10))
