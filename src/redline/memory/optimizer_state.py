"""The optimizer-state lever: the one place redline's optimizer is made, for each
`memory.optimizer_state`.

AdamW keeps two moments per trainable element; in fp32 that is 8 bytes, twice the
parameters themselves, and for a model whose states dominate (a wide MLP, a large
embedding) the largest share of a step's memory. torchao keeps them smaller:

    fp32         torch AdamW, fused                        8 bytes per element
    8bit         torchao AdamW8bit: block-quantized codes   2 (+ one fp32 scale per 256)
    4bit         torchao AdamW4bit: block-quantized codes   1 (+ one fp32 scale per 128)
    cpu-offload  torchao CPUOffloadOptimizer: the states    0 on the device (all on the
                 and the update on the host (CUDA only)     host, fp32)

The quantized kinds dequantize each state to fp32, update in fp32 and quantize back, one
parameter at a time, in a step torchao compiles (`fullgraph=True`); tensors under 4096
elements (biases, norms) keep fp32 states. Their update is not AdamW's to the bit: the
parameters drift from fp32 AdamW's by a bounded amount (measured in
tests/unit/test_optimizer_state.py, documented in docs/memory.md). Their learning rate is
a tensor in each param group (torchao's choice): torch's LR schedulers fill it in place.

There is no bf16 kind: torchao 0.18 offers bf16 states only for bf16 parameters (its
stochastic rounding is of the parameters), and bf16 moments rounded to nearest stop
moving once an update is smaller than half a bf16 step (AdamW's second moment changes by
0.1 % a step; bf16 resolves 0.4 %), so it would silently stall.

A task's own optimizer is the task's: the lever replaces redline's AdamW only, and is
refused over it (`check_task_optimizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from redline.errors import ConfigError
from redline.fp8 import torchao_import

# The kinds this module makes (memory.config.OPTIMIZER_STATES), and torchao's class for
# the quantized ones.
KINDS = ("fp32", "8bit", "4bit", "cpu-offload")
_QUANTIZED = {"8bit": "AdamW8bit", "4bit": "AdamW4bit"}


def make_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float,
                   kind: str = "fp32") -> torch.optim.Optimizer:
    """AdamW over `params` (trainable, non-empty) keeping its state as `kind` says (module
    docstring). Raises ConfigError where `kind` cannot run on the parameters' device, and
    MissingExtra where torchao is not installed."""
    assert kind in KINDS, kind
    assert params, "no parameters to optimize"
    devices = {p.device.type for p in params}
    if kind == "fp32":
        fused = devices <= {"cpu", "cuda"}
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 **({"fused": True} if fused else {"foreach": True}))
    if kind == "cpu-offload":
        if devices != {"cuda"}:
            raise ConfigError(
                "memory.optimizer_state=cpu-offload runs on CUDA only: it moves the optimizer "
                "state to the host and torchao's CPUOffloadOptimizer supports only CUDA and "
                f"XPU parameters, not {', '.join(sorted(devices))}; use "
                "memory.optimizer_state=8bit (or 4bit) to shrink the state instead")
        optim = torchao_import("torchao.optim", "memory.optimizer_state=cpu-offload")
        return optim.CPUOffloadOptimizer(params, torch.optim.AdamW, lr=lr,
                                         weight_decay=weight_decay, fused=True)
    optim = torchao_import("torchao.optim", f"memory.optimizer_state={kind}")
    return getattr(optim, _QUANTIZED[kind])(params, lr=lr, weight_decay=weight_decay)


def check_task_optimizer(optimizer: Any, task_name: str, kind: str) -> None:
    """Refuse `kind` over the task's own `optimizer`: the lever replaces redline's AdamW."""
    if kind != "fp32":
        raise ConfigError(
            f"memory.optimizer_state={kind} replaces redline's AdamW only, but task "
            f"{task_name!r} builds its own optimizer ({type(optimizer).__name__}); remove "
            "the task's optimizer() or set memory.optimizer_state: fp32")

