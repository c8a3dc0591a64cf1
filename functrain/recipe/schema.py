"""The recipe schema: frozen attrs config classes, one per section, and their field helpers.

Each scalar field says in its metadata what it allows (`expect`, the text of a problem),
how to test a value past its type (`check`) and, where the recipe key is no Python name,
that key (`key`). `functrain.recipe.parse` reads these to validate plain data.
"""

import re
from collections.abc import Callable
from typing import Any, Literal

import attrs

from functrain.errors import RecipeError
from functrain.recipe._check import Component, describe, outside_int64, show, type_ok

# Signals a recipe may name in `checkpoint.signal`, on top of SIGTERM and SIGINT.
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGXCPU")


def _field(
    *,
    expect: str,
    check: Callable[[Any], bool] | None = None,
    key: str | None = None,
    false_is: str | None = None,
    **kw: Any,
) -> Any:
    """A config field: `expect` says what is allowed, `check` tests the value past its type,
    `key` is its recipe key when that is no Python name (see `config_fields`), `false_is`
    the choice YAML's `off` means (YAML 1.1 reads `off` and `no` as false)."""
    metadata = {"expect": expect, "check": check, **({"key": key} if key else {})}
    if false_is is not None:
        metadata["false_is"] = false_is
    return attrs.field(metadata=metadata, validator=_on_set, **kw)


def _on_set(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    # Runs only when code builds or evolves a config directly; parse_recipe checks first.
    problem = scalar_problem(value, attribute, f"{type(inst).__name__}.{attribute.name}")
    if problem:
        raise RecipeError([problem], "<config>")


def _positive(v: Any) -> bool:
    return v is None or v > 0


_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DEVICE = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)\Z")


@attrs.frozen(kw_only=True)
class DataConfig:
    """The `data:` section."""

    dataset: Component
    batch_size: int = _field(expect="an integer > 0 (the global batch size)", check=_positive)
    shuffle: bool = _field(default=True, expect="true or false")
    num_workers: int = _field(default=0, expect="an integer >= 0", check=lambda v: v >= 0)
    replay: bool = _field(
        default=False,
        expect="true or false (true: resume a plain IterableDataset by reading and skipping "
        "the samples before the cursor, time linear in the position)",
    )


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """The `checkpoint:` section: snapshot cadence and retention."""

    every: int | None = _field(
        default=None, expect="an integer > 0, or null (only the final snapshot)", check=_positive
    )
    keep_last: int | None = _field(
        default=None, expect="an integer > 0, or null (keep all)", check=_positive
    )
    async_save: bool = _field(
        default=False,
        key="async",
        expect="true or false (true: write snapshots in the background, stalling only for a copy)",
    )
    keep_every: int | None = _field(
        default=None,
        expect="an integer > 0 (keep snapshots whose step is a multiple of it), or null",
        check=_positive,
    )
    trainable_only: bool = _field(
        default=False,
        expect="true or false (true: snapshots leave out the frozen params, which the "
        "recipe rebuilds — from init_from — and a resume checks by their hash)",
    )
    on_error: Literal["stop", "continue"] = _field(
        default="stop",
        expect="'stop' (a failed snapshot ends the run, exit 2) or 'continue' (warn, train on)",
    )
    signal: str | None = _field(
        default=None,
        expect=f"null or one of {', '.join(SIGNALS)} (stop cleanly on it, as on SIGTERM)",
        check=lambda v: v in SIGNALS,
    )
    grace: float = _field(
        default=30.0,
        expect="a number of seconds > 0: how long the launcher waits after SIGTERM before it "
        "kills (torchrun: 30); a stop whose snapshot took longer last time is warned of",
        check=lambda v: v > 0,
    )


@attrs.frozen(kw_only=True)
class EvalConfig:
    """The `eval:` section."""

    every: int | None = _field(
        default=None, expect="an integer > 0, or null (no eval)", check=_positive
    )
    batches: int | Literal["all"] = _field(
        default=10,
        expect="an integer > 0, or 'all' (every validation sample once, in order)",
        check=lambda v: v == "all" or v > 0,
    )


@attrs.frozen(kw_only=True)
class LossScaleConfig:
    """The `loss_scale:` section: fp16's dynamic loss scaling (torch.amp.GradScaler's defaults)."""

    init: float = _field(default=2.0**16, expect="a number > 0", check=lambda v: v > 0)
    growth_factor: float = _field(default=2.0, expect="a number > 1", check=lambda v: v > 1)
    backoff_factor: float = _field(
        default=0.5, expect="a number between 0 and 1", check=lambda v: 0 < v < 1
    )
    growth_interval: int = _field(
        default=2000,
        expect="an integer > 0 (finite steps in a row before the scale grows)",
        check=_positive,
    )


@attrs.frozen(kw_only=True)
class LogConfig:
    """The `log:` section: where metrics go besides `metrics.jsonl`, the source of truth."""

    tensorboard: bool = _field(
        default=False,
        expect="true or false (true: TensorBoard events in <run>/tensorboard, needs the "
        "extra functrain[tensorboard])",
    )
    wandb: bool = _field(
        default=False,
        expect="true or false (true: a Weights & Biases run, resumed with the run, needs the "
        "extra functrain[wandb])",
    )
    wandb_project: str | None = _field(
        default=None, expect="a W&B project name, or null (W&B's default)", check=bool
    )
    train_metrics: bool = _field(
        default=False,
        expect="true or false (true: the recipe's metrics also on each log step's training "
        "batch, after its update, logged as train_<name>)",
    )


#: `compile.mode`s: those of torch.compile that pick no kernels by timing.
COMPILE_MODES = ("default", "reduce-overhead")


@attrs.frozen(kw_only=True)
class CompileConfig:
    """The `compile:` section; `compile: true` / `false` is short for `{enabled: ...}`."""

    enabled: bool = _field(default=True, expect="true or false")
    mode: str = _field(
        default="default",
        expect=f"one of {', '.join(COMPILE_MODES)} (the max-autotune modes pick kernels by "
        "timing, which can differ between processes and so break bitwise resume)",
        check=lambda v: v in COMPILE_MODES,
    )


@attrs.frozen(kw_only=True)
class Recipe:
    """A validated run recipe. Component fields are checked but not instantiated."""

    name: str = _field(
        expect="a name of letters, digits, '-', '_', '.' (not '.' or '..')",
        check=lambda v: bool(_NAME.match(v)) and v not in (".", ".."),
    )
    out_dir: str = _field(default="runs", expect="a non-empty path", check=bool)
    seed: int = _field(default=0, expect="an integer >= 0", check=lambda v: v >= 0)
    steps: int = _field(expect="an integer > 0 (total optimizer steps)", check=_positive)
    device: str = _field(
        default="auto",
        expect="'auto', 'cpu', 'cuda' or 'cuda:N'",
        check=lambda v: bool(_DEVICE.match(v)),
    )
    parallel: Literal["ddp", "fsdp"] = _field(
        default="ddp",
        expect="'ddp' (under torchrun every rank holds the whole state) or 'fsdp' (params, "
        "gradients and optimizer state sharded over the ranks with FSDP2)",
    )
    bucket_mb: float = _field(
        default=25.0,
        expect="a number of MiB >= 0: under torchrun with parallel: ddp, gradients are "
        "reduced in buckets of about this size, each started as soon as backward has made "
        "it (overlapping backward); 0: reduced after backward, without overlap",
        check=lambda v: v >= 0,
    )
    activation_checkpointing: bool = _field(
        default=False,
        expect="true or false (true: each block of the model's nn.ModuleLists recomputes its "
        "activations in backward: less memory for about one more forward, the same bits)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = _field(
        default="fp32",
        expect="'fp32', 'bf16' (autocast to bfloat16, float32 params and optimizer state) or "
        "'fp16' (autocast to float16 with dynamic loss scaling, see loss_scale)",
    )
    loss_scale: LossScaleConfig = attrs.field(factory=LossScaleConfig)
    nan_policy: Literal["stop", "skip", "continue"] = _field(
        default="stop",
        expect="'stop' (a step with a non-finite loss or gradients ends the run, naming the "
        "step; nothing after it is saved), 'skip' (its update is left out and counted) or "
        "'continue' (counted only)",
    )
    determinism: Literal["strict", "warn", "off"] = _field(
        default="strict",
        expect="'strict' (deterministic kernels only: an op without one stops the run, "
        "naming it; resume is bitwise), 'warn' (such an op runs and torch warns) or 'off' "
        "(torch's defaults); with warn or off the run is not promised bitwise",
        false_is="off",
    )
    tf32: bool = _field(
        default=False,
        expect="true or false (true: float32 matmuls and convolutions on CUDA use TF32, "
        "faster and less precise, still deterministic)",
    )
    compile: CompileConfig = attrs.field(factory=lambda: CompileConfig(enabled=False))
    model: Component
    init_from: str | None = _field(
        default=None,
        expect="null, or the weights to start from: a .safetensors file, a save_pretrained "
        "directory, or a functrain snapshot (state_N; its weights only)",
        check=bool,
    )
    init_from_map: dict = _field(
        factory=dict,
        expect="a mapping of key prefixes in the init_from file to the model's ({'model.': ''})",
        check=lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
        ),
    )
    freeze: list[str] = attrs.field(
        factory=list,
        metadata={
            "expect": "a list of parameter name patterns ('transformer.wte.*', "
            "'*.bias'): the matching parameters are frozen (no gradient, no optimizer "
            "state, never changed)"
        },
    )
    loss: Component
    data: DataConfig = attrs.field(
        metadata={"expect": "a mapping with at least `dataset:` (a component) and `batch_size:`"}
    )
    optim: Component
    # `fill`: a parameter of the target that, when accepted and not given, takes a sibling's value.
    schedule: Component = attrs.field(
        factory=lambda: Component(target="functrain.schedule.constant"),
        metadata={"fill": {"total_steps": "steps"}},
    )
    step: list[Component] = attrs.field(metadata={"expect": "a non-empty list of components"})
    metrics: list[Component] = attrs.field(
        factory=list,
        metadata={
            "expect": "a list of metric components (functrain.metrics.accuracy, "
            "functrain.metrics.perplexity, or your own), computed at eval",
            "empty": True,
        },
    )
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    auto_resume: bool = _field(
        default=False,
        expect="true or false (true: `functrain run` continues from the run directory's newest "
        "valid snapshot when it holds one, as `resume --from latest` does; for jobs a "
        "scheduler or torchrun restarts)",
    )
    log_every: int = _field(default=10, expect="an integer > 0", check=_positive)
    log: LogConfig = attrs.field(factory=LogConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)


# ---------------------------------------------------------------------------- field helpers


def config_fields(cls: type) -> dict[str, attrs.Attribute]:
    """An attrs config class's fields by recipe key: the field name, or `metadata["key"]`
    where the key is no Python name (`checkpoint.async` is the field `async_save`)."""
    return {f.metadata.get("key", f.name): f for f in attrs.fields(cls)}


def expected(f: attrs.Attribute) -> str:
    """What field `f` allows, in words."""
    return f.metadata.get("expect") or describe(f.type)


def scalar_problem(value: Any, f: attrs.Attribute, path: str) -> str | None:
    """The problem with `value` as the scalar field `f` at `path`, or None if it is allowed."""
    check = f.metadata.get("check")
    if not type_ok(value, f.type) or not (check is None or value is None or check(value)):
        return f"{path}: got {show(value)}; expected {expected(f)}"
    if outside_int64(value):  # the state and a snapshot's manifest hold integers as int64
        return f"{path}: got {show(value)}; expected {expected(f)}, at most 2**63 - 1"
    return None
