"""What bitwise resume asks of torch beyond the state: kernels that give the same bits on
every run, in every process.

Eager CPU kernels already do. Two places do not by default:
- **CUDA**: cuBLAS picks its workspace per stream, cuDNN picks convolution algorithms by
  timing (`benchmark`), and some kernels add with atomics. `configure` sets
  `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless already set), `cudnn.deterministic = True`,
  `cudnn.benchmark = False` and `torch.use_deterministic_algorithms(True)`; an op with no
  deterministic CUDA kernel then raises instead of running inexactly. TF32 is left as torch
  sets it (deterministic either way) and recorded.
- **torch.compile**: inductor's CPU and GPU code adds scattered values (an embedding's
  gradient) with atomics across threads, and may pick kernels by timing.
  `use_deterministic_algorithms(True)` makes it fall back to the sorted eager kernels, and
  `torch._inductor.config.deterministic` turns off benchmarking that changes numerics.

Uninitialised memory is not filled (`fill_uninitialized_memory = False`): the state never
reads it, and filling every `torch.empty` costs time. The settings are process-wide, like
the global RNG; a run records what it set in each snapshot's manifest.

The recipe picks a mode (`determinism:`):
- `strict` (default): the above on every device, CPU included (a CPU op such as `put_`
  with repeated indices has no deterministic kernel either); an op without a
  deterministic kernel stops the run with a message naming it (`refusal`).
- `warn`: the same settings, but such an op runs and torch warns: not promised bitwise.
- `off`: torch's defaults (cuDNN may pick algorithms by timing): not promised bitwise.
`tf32: true` lets float32 matmuls and convolutions on CUDA use TF32 (faster, less precise,
still deterministic: bitwise resume holds); false (default) keeps full float32.
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["CUBLAS_WORKSPACE", "MODES", "configure", "promised", "refusal", "refused_op"]

#: The recipe's `determinism:` values.
MODES = ("strict", "warn", "off")

#: The cuBLAS workspace setting deterministic algorithms need (torch's documented choice).
CUBLAS_WORKSPACE = ":4096:8"


def configure(
    device: torch.device, compiled: bool, mode: str = "strict", tf32: bool = False
) -> dict[str, object]:
    """Set what bitwise resume needs for a run on `device` in `mode` (see the module's
    docstring); return the settings in effect. Call it before the first CUDA kernel runs
    (cuBLAS reads its workspace setting once)."""
    if mode not in MODES:
        raise ValueError(f"determinism mode must be one of {MODES}, got {mode!r}")
    exact = mode != "off"
    torch.use_deterministic_algorithms(exact, warn_only=mode == "warn")
    if exact:
        torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        if exact:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = exact
        torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if compiled:
        import torch._inductor.config as inductor

        inductor.deterministic = exact
    return {"mode": mode, "tf32": tf32, **current(device, compiled)}


def promised(settings: dict | None) -> bool:
    """Whether a manifest's determinism settings keep the bitwise promise (a snapshot from
    before the modes existed was strict)."""
    return (settings or {}).get("mode", "strict") == "strict"


_NO_KERNEL = re.compile(r"^(\S+?)(?: with [^,]*)? does not have a deterministic implementation")


def refused_op(err: BaseException) -> str | None:
    """The op, if `err` is torch refusing one that has no deterministic kernel."""
    found = isinstance(err, RuntimeError) and _NO_KERNEL.search(str(err).strip())
    return found.group(1) if found else None


def refusal(op: str) -> str:
    """The message for a strict run that met `op`."""
    return (
        f"determinism: strict: the model ran {op}, which has no deterministic kernel on this "
        "device, so the run could not be resumed bitwise. Use another op (e.g. index_add_ "
        "or a scatter that sorts), or set determinism: warn (it runs, torch warns, and the "
        "run is no longer promised bitwise) or determinism: off"
    )


def current(device: torch.device, compiled: bool) -> dict[str, object]:
    """The settings that bear on exactness, as a manifest records them."""
    out: dict[str, object] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if compiled:
        import torch._inductor.config as inductor

        out["inductor_deterministic"] = inductor.deterministic
    if device.type == "cuda":
        out |= {
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    return out
