"""The update that ends a step: the gradient norm (clipped or not), the optimizer step or
its skip, the scheduler.

Nothing here reads a device value on the host: the loss comes back as a device tensor,
the gradient norm stays on the device (`Engine.grad_norm`), and the caller decides when
to look at them (the telemetry window). `skip_nonfinite` skips the update of a step whose
gradient norm is not finite. Where the norm lives in host memory (CPU) it is read there:
no sync, and ~5 us a step against ~45 us for the three extra ops and the step-count undo
of the flag path (measured in a CPU training loop). On a device, a fused optimizer (what
the trainer builds) is handed the flag as `found_inf` and skips on the device, no host
read; another optimizer needs one host read (a sync) a step. fp16's GradScaler skips
such steps itself (on the device with a fused optimizer, after a host read of its inf
flag otherwise). Where whether it skipped is known on the host for free (the hook's flag,
or a gradient norm in host memory), the steps feed a `ScalerWatch`: while the scaler skips
more than SCALER_SKIP_SHARE of SCALER_WINDOW steps, each skipped step fires Event.ANOMALY
(kind "scaler_skips", with the skipped steps in a row), on which the trainer warns at once
and counts them toward train.nonfinite_patience (run/watch.py): fp16 cannot train nothing
silently. With a fused optimizer on a device, knowing would cost a sync a step: there the
telemetry window's `skipped_steps` carries the count.
"""

from __future__ import annotations

import math

import torch

from redline._torch_compat import found_inf_given, supports_found_inf
from redline.memory.sharding import plain_value
from redline.precision import Precision


def gradient_norm(params: list[torch.Tensor], grad_clip: float | None, dtensors: bool
                  ) -> torch.Tensor | None:
    """The gradients' global norm, clipped to `grad_clip` first; None without gradients
    (and no clipping)."""
    if grad_clip is not None:  # clipping computes the norm anyway (no grads: 0)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
    if norm is None:
        return None
    # computed under no_grad: nothing to detach. Sharded: a replicated DTensor holding the
    # norm over all shards; its local value is that norm (no collective)
    return plain_value(norm) if dtensors else norm


def flag_on_device(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   host_reads: bool | None) -> bool:
    """Whether skip_nonfinite hands the optimizer its flag on the device (module
    docstring): a fused optimizer, unless the norm is read on the host."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    return supports_found_inf(optimizer) and not (
        on_cpu if host_reads is None else host_reads)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, precision: Precision,
                          norm: torch.Tensor, on_device: bool) -> bool | torch.Tensor:
    """The optimizer step unless `norm` is not finite; whether it was applied (a device
    bool tensor where the skip was decided on the device)."""
    if on_device:  # the kernel skips the update and its step count
        bad = torch.isfinite(norm).logical_not()
        with found_inf_given(optimizer, bad.float()):
            precision.optimizer_step(optimizer)
        return bad.logical_not()
    if not math.isfinite(norm.item()):  # host read: free on CPU; on a GPU a sync
        return False
    return precision.optimizer_step(optimizer)


def scheduling(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int | None) -> bool:
    """Whether to step `scheduler`: not past the run's length (`steps`), nor a
    fixed-length schedule's (OneCycleLR raises there; a resumed run given more
    train.steps keeps the checkpoint's total_steps)."""
    end = min(steps or math.inf, getattr(scheduler, "total_steps", None) or math.inf)
    return getattr(scheduler, "last_epoch", 0) < end
