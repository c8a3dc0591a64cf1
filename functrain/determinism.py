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
"""

from __future__ import annotations

import os

import torch

__all__ = ["CUBLAS_WORKSPACE", "configure", "needed"]

#: The cuBLAS workspace setting deterministic algorithms need (torch's documented choice).
CUBLAS_WORKSPACE = ":4096:8"


def needed(device: torch.device, compiled: bool) -> bool:
    """Whether a run on `device` (compiled or not) needs deterministic algorithms."""
    return device.type == "cuda" or compiled


def configure(device: torch.device, compiled: bool) -> dict[str, object]:
    """Set what bitwise resume needs for a run on `device`; return the settings in effect.

    Call it before the first CUDA kernel runs (cuBLAS reads its workspace setting once).
    """
    if needed(device, compiled):
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if compiled:
        import torch._inductor.config as inductor

        inductor.deterministic = True
    return current(device, compiled)


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
