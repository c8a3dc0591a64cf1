"""`functrain sample SNAPSHOT`: text from a language-model snapshot, deterministic per seed.

The model is rebuilt as `functrain.cli.rebuild` allows — from the snapshot's manifest
when it is functrain's own, else from `--recipe FILE` (or under `--trust-recipe`) — and
given the snapshot's params (or, with `--ema`, their moving average). Tokens are bytes
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
from functrain.cli.rebuild import rebuild_model
from functrain.errors import RunError
from functrain.losses import logits_of, structure
from functrain.state import load_into

__all__ = ["refuse_trainable_only", "sample"]


def sample(
    snapshot: Path,
    *,
    prompt: str = "\n",
    tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    ema: bool = False,
    recipe: Path | None = None,
    trust_recipe: bool = False,
) -> str:
    """The prompt followed by `tokens` sampled ones, as text; the model from `recipe` (a
    recipe file) when given, else from the manifest (see `functrain.cli.rebuild`)."""
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise RunError("--tokens and --temperature must be >= 0, --top-k >= 1")
    tensors, manifest = checkpoint.load(snapshot)
    refuse_trainable_only(snapshot, manifest)
    model = rebuild_model(snapshot, manifest, recipe=recipe, trust=trust_recipe)
    try:
        load_into(model, tensors, ema=ema)
    except (ValueError, RuntimeError) as err:
        raise RunError(f"{snapshot}: its weights do not fit the recipe's model: {err}") from err
    model.eval()
    ids = list(prompt.encode("utf-8")) or [10]
    block = getattr(model, "block_size", None) or _positions(model) or len(ids) + tokens
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _check_generative(snapshot, model, manifest)
        for _ in range(tokens):
            context = torch.tensor([ids[-block:]])
            logits = logits_of(model(context), "sample")[0, -1].double()
            ids.append(_draw(logits, temperature, top_k, g))
    return bytes(ids).decode("utf-8", errors="replace")


def _positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)  # a transformers model's context length
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _check_generative(snapshot: Path, model: torch.nn.Module, manifest: dict) -> None:
    """Refuse, by name, a model that does not map token ids [1, T] to logits [1, T, 256]."""
    target = (manifest.get("recipe", {}).get("model") or {}).get("_component_", "the model")
    try:
        out = model(torch.tensor([[10, 10]]))
        logits = logits_of(out, "sample")
    except Exception as err:
        raise RunError(
            f"{snapshot}: sample needs a language model that maps token ids [batch, tokens] "
            f"to logits [batch, tokens, vocab]; {target} failed on token ids: "
            f"{type(err).__name__}: {err}"
        ) from err
    if logits.dim() != 3 or logits.shape[:2] != (1, 2):
        raise RunError(
            f"{snapshot}: sample needs a language model that maps token ids [batch, tokens] "
            f"to logits [batch, tokens, vocab]; {target} returned {structure(out)}"
        )
    if logits.shape[-1] != 256:
        raise RunError(
            f"{snapshot}: the model's vocabulary has {logits.shape[-1]} tokens; sample speaks "
            "bytes (256) only, so decode this model's ids with its own tokenizer"
        )


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, g) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        cut = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))


def refuse_trainable_only(snapshot: Path, manifest: dict) -> None:
    """A snapshot without its frozen params is no whole model: say so, and what to do."""
    if manifest.get("trainable_only"):
        raise RunError(
            f"{snapshot} holds the trainable params only (checkpoint.trainable_only: true); "
            "the frozen ones come from the run's init_from. For a whole model, resume it "
            "with checkpoint.trainable_only=false --until <its step + 1> and use that snapshot"
        )
