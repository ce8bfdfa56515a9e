"""How the Engine steps: its settings (`EngineConfig`), checked when made, and the loss
function's shape (`LossFn`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from redline.memory.guard import OOMGuard
from redline.precision import Precision

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# Attempts of each micro-batch size run under `memory_check`: the first allocates the
# optimizer's state (AdamW's, at its first step), the second is the steady state.
CHECKED_STEPS = 2


@dataclass(frozen=True)
class EngineConfig:
    """How the Engine steps, checked when made. What it steps (model, optimizer, scheduler)
    and whom it tells (dispatcher, state, comm) are the Engine's own arguments."""

    precision: Precision | str = "fp32"
    """The precision policy, or its name (resolved for the model's device)."""
    grad_clip: float | None = None
    """Clip the gradients' global norm to this; None: no clipping (the norm is kept)."""
    micro_batch_size: int | None = None
    """Samples per forward/backward; a larger batch is split and its gradients accumulated
    exactly (engine/step.py). None: every batch whole."""
    oom_guard: OOMGuard | bool = False
    """Redo a step that runs out of memory with smaller micro-batches: True (a guard from
    micro_batch_size), a configured OOMGuard, or False."""
    memory_check: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    """With the guard: a context (a tracked memory budget) that each micro-batch size's
    first two attempts run in (the second holds the optimizer's state: the steady state),
    where the allocator itself would not raise (job/build.py)."""
    skip_nonfinite: bool = False
    """Skip the update of a step whose gradient norm is not finite (engine/update.py)."""
    host_reads: bool | None = None
    """Check the gradient norm on the host: None where it is host memory (the CPU); False
    runs the device path (a fused optimizer's `found_inf`) anywhere."""

    def __post_init__(self) -> None:
        clip, micro = self.grad_clip, self.micro_batch_size
        if clip is not None and not clip > 0:
            raise ValueError(f"grad_clip must be a positive number or None, got {clip!r}")
        if micro is not None and micro < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro!r}")
        if self.oom_guard is True and self.micro_batch_size is None:
            raise ValueError("oom_guard needs a micro_batch_size to shrink from")

    @classmethod
    def of(cls, config: EngineConfig | Precision | str | None, **settings: Any) -> EngineConfig:
        """`config` with `settings` replaced; a precision (or None) starts from the defaults."""
        if isinstance(config, EngineConfig):
            return dataclasses.replace(config, **settings) if settings else config
        return cls(**settings) if config is None else cls(precision=config, **settings)
