"""Plain `nn.Module`s used by the shipped recipes; they know nothing of functrain."""

from functrain.models.gpt import GPT
from functrain.models.mlp import MLP

__all__ = ["GPT", "MLP"]
