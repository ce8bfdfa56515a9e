"""Statistics of a model's numbers: per-tensor summaries, and where a step first went
non-finite.

`tensor_stats` summarises a list of tensors (a layer's parameters, gradients or
activations) into one [n, len(STAT_NAMES)] float32 tensor on their device: a few fused
reductions per tensor (norms batched in one foreach kernel), nothing read by the host,
so the caller decides when to pay for the read (inspector.py reads at a telemetry window).
`fp8_stats` adds what an fp8 cast would do to a tensor: its amax, and the fraction of its
values that the cast saturates or flushes to zero.

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
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from redline._torch_compat import foreach_norm

LossFn = Callable[[nn.Module, Any], torch.Tensor]

STAT_NAMES = ("norm", "mean", "std", "min", "max", "absmax", "zero_frac", "nan", "inf")
FP8_STAT_NAMES = ("amax", "saturated_frac", "underflow_frac")
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def tensor_stats(tensors: list[torch.Tensor], host_reads: bool = False) -> torch.Tensor:
    """[len(tensors), len(STAT_NAMES)] float32 on the tensors' device.

    Norms come from one foreach kernel; per tensor the mean, the centred norm (std),
    aminmax and the zero count. (A segmented reduction over all tensors at once, and
    std_mean, were measured slower on CPU.) NaN and Inf are counted, not hidden; counting
    them takes elementwise comparisons, which on a CPU cost more than all the rest
    together (~3x). With `host_reads` (where reading a value is free: a CPU), one read of
    whether every tensor's norm and mean are finite skips those counts when they must be
    0 (a tensor holding NaN or Inf has a non-finite norm); without it nothing is read and
    they are always counted."""
    if not tensors:
        return torch.empty(0, len(STAT_NAMES))
    flat = [t.detach().reshape(-1).float() for t in tensors]
    norms = foreach_norm(flat)
    rows, sizes = [], []
    for f, norm in zip(flat, norms, strict=True):
        n = max(f.numel(), 1)
        mean = f.mean() if f.numel() else f.new_zeros(())
        std = torch.linalg.vector_norm(f - mean) / math.sqrt(n)  # 5x std_mean's speed
        lo, hi = torch.aminmax(f) if f.numel() else (f.new_zeros(()), f.new_zeros(()))
        rows.append(torch.stack([norm, mean, std, lo, hi, torch.maximum(-lo, hi),
                                 (f.numel() - torch.count_nonzero(f)) / n]).float())
        sizes.append(n)
    table = torch.stack(rows)
    if host_reads and bool(table[:, :2].isfinite().all()):  # a host read: free on a CPU
        return torch.cat([table, table.new_zeros(len(rows), 2)], dim=1)
    counts = torch.stack([torch.stack([torch.count_nonzero(f.isnan()),
                                       torch.count_nonzero(f.isinf())]) for f in flat])
    return torch.cat([table, counts.float()], dim=1)


def histograms(tensors: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor,
               bins: int = 32) -> torch.Tensor:
    """[len(tensors), bins] counts of each tensor's finite values in `bins` equal bins from
    its lo to its hi (device tensors, e.g. tensor_stats' min and max): a scatter-add, no
    host read (torch.histc and bincount size or range their output on the host)."""
    out = []
    for f, a, b in zip((t.detach().reshape(-1).float() for t in tensors), lo, hi, strict=True):
        width = (b - a).clamp(min=1e-30)
        finite = torch.isfinite(f)
        idx = ((f - a) / width * bins).nan_to_num(0.0).clamp(0, bins - 1).long()
        out.append(torch.zeros(bins, device=f.device).scatter_add_(0, idx, finite.float()))
    return torch.stack(out) if out else torch.empty(0, bins)


def fp8_stats(tensor: torch.Tensor) -> torch.Tensor:
    """[len(FP8_STAT_NAMES)]: amax, and the fractions of values an e4m3 cast with one scale
    for the tensor (448 / amax, as torchao's tensorwise recipe computes it) saturates or
    flushes to zero. With a scale from this tensor's own amax nothing saturates; a value
    saturates when the scale came from a smaller amax, as in delayed scaling."""
    f = tensor.detach().reshape(-1).float()
    amax = f.abs().max() if f.numel() else f.new_zeros(())
    scale = E4M3_MAX / amax.clamp(min=1e-12)
    scaled = f * scale
    n = max(f.numel(), 1)
    cast = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    saturated = (scaled.abs() > E4M3_MAX * (1 + 1e-6)).sum() / n  # not amax itself
    underflow = ((cast == 0) & (f != 0)).sum() / n
    return torch.stack([amax, saturated, underflow])


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
