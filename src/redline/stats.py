"""Statistics of a model's numbers: where a step first went non-finite.

`first_nonfinite` re-runs one step's forward and backward on a copy of the model with a
forward hook on every module, and names the first module, in execution order, whose output
was not finite; or else, after backward, the module nearest the loss whose parameters'
gradients were not (backward runs from the loss back, so that is where they went bad).
It is a diagnosis, run once when a run meets a non-finite step: the copy costs the
model's memory once, the RNG is forked so training's stream does not move, and the
trained model is never touched.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _finite(value: Any) -> bool:
    tensors = [v for v in (value if isinstance(value, (tuple, list)) else (value,))
               if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def first_nonfinite(model: nn.Module, batch: Any, loss_fn: LossFn,
                    forward_context: Callable[[], contextlib.AbstractContextManager[Any]]
                    = contextlib.nullcontext) -> str | None:
    """Where `loss_fn(model, batch)` first goes non-finite, in words, or None if it is
    finite throughout: "output of <module>", "the loss (every module's output finite)",
    or "gradient into <module>"."""
    shadow = copy.deepcopy(model)
    names = {m: name or "the model" for name, m in shadow.named_modules()}
    order: list[nn.Module] = []  # modules as their forward finished
    found: list[str] = []

    def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
        order.append(module)
        if not found and not _finite(output):
            found.append(f"output of {names[module]} ({type(module).__name__})")

    handles = [m.register_forward_hook(forward_hook) for m in shadow.modules()]
    devices = sorted({p.device.index or 0 for p in shadow.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            with forward_context():
                loss = loss_fn(shadow, batch)
            if found:
                return found[0]
            if not _finite(loss):
                return "the loss (every module's output was finite)"
            loss.float().backward()
        for module in reversed(order):  # nearest the loss first
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if grads and not _finite(grads):
                return f"gradient of {names[module]} ({type(module).__name__})"
        return None
    finally:
        for handle in handles:
            handle.remove()
        del shadow
