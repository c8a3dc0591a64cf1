"""`functrain sample SNAPSHOT`: text from a language-model snapshot, deterministic per seed.

The model is rebuilt from the recipe the snapshot's manifest holds (its `model` component)
and given the snapshot's params (or, with `--ema`, their moving average). Tokens are bytes
(the recipes' vocabulary of 256): the prompt is encoded as UTF-8, the output decoded with
replacement of broken sequences. Each new token is drawn from the softmax of the last
logits divided by the temperature, restricted to the `top_k` most likely, with a generator
seeded from `--seed`, so the same snapshot, prompt and seed give the same text;
`--temperature 0` is greedy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from functrain import checkpoint
from functrain.errors import RecipeError, RunError
from functrain.recipe import Component, instantiate
from functrain.state import load_into

__all__ = ["sample"]


def sample(
    snapshot: Path,
    *,
    prompt: str = "\n",
    tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    ema: bool = False,
) -> str:
    """The prompt followed by `tokens` sampled ones, as text."""
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise RunError("--tokens and --temperature must be >= 0, --top-k >= 1")
    tensors, manifest = checkpoint.load(snapshot)
    model = _model(snapshot, manifest)
    try:
        load_into(model, tensors, ema=ema)
    except (ValueError, RuntimeError) as err:
        raise RunError(f"{snapshot}: its weights do not fit the recipe's model: {err}") from err
    model.eval()
    vocab = model.tok.num_embeddings if hasattr(model, "tok") else 256
    if vocab != 256:
        raise RunError(
            f"{snapshot}: the model's vocabulary has {vocab} tokens; sample speaks bytes "
            "(256) only, so decode this model's ids with its own tokenizer"
        )
    ids = list(prompt.encode("utf-8")) or [10]
    block = getattr(model, "block_size", len(ids) + tokens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(tokens):
            context = torch.tensor([ids[-block:]])
            logits = model(context)[0, -1].double()
            ids.append(_draw(logits, temperature, top_k, g))
    return bytes(ids).decode("utf-8", errors="replace")


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, g) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        cut = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))


def _model(snapshot: Path, manifest: dict) -> torch.nn.Module:
    spec = dict(manifest.get("recipe", {}).get("model") or {})
    target = spec.pop("_component_", None)
    if not isinstance(target, str):
        raise RunError(f"{snapshot}: its manifest records no recipe model to rebuild")
    try:
        return instantiate(Component(target=target, kwargs=spec))
    except RecipeError as err:
        raise RunError(f"{snapshot}: cannot rebuild the recipe's model: {err}") from err
