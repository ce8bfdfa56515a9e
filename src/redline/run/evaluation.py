"""Evaluation: the loss and the task's metrics, without disturbing training.

It runs under a forked RNG re-seeded with the run's seed: training's random stream is
left exactly where it was (exact resume depends on it), and every evaluation of a run
draws the same noise, so its numbers are comparable from one evaluation to the next.

A task's evaluation sets (`eval_data` returning a dict) are evaluated one after the other,
each through the job's own loader (`Job.eval_loader`, as the dry run does): a lone set's
metrics keep their names (recorded as `eval/<metric>`), a named set's are `<set>/<metric>`
(recorded as `eval/<set>/<metric>`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from redline import batch as batch_tree
from redline.data import LimitedLoader
from redline.device import DeviceInfo
from redline.job.build import Job
from redline.precision import Precision
from redline.task import Task


def evaluate(task: Task, model: nn.Module, loader: Any, precision: Precision,
             device: DeviceInfo, seed: int) -> dict[str, float]:
    """{"loss": mean evaluation loss, **task.evaluate(model, loader)} in eval mode."""
    devices = [device.index or 0] if device.is_cuda else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            metrics = {"loss": _mean_loss(task, model, loader, precision, device)}
            with precision.forward_context():
                metrics.update(task.evaluate(model, loader))
    finally:
        model.train()
    return metrics


def evaluate_sets(job: Job, batch_size: int, limit: int | None, seed: int
                  ) -> dict[str, float]:
    """`evaluate` over each of the job's evaluation sets, at most `limit` batches of
    `batch_size` each (all: None), metrics named as the module docstring says."""
    metrics: dict[str, float] = {}
    for name in job.eval_sets:
        loader = LimitedLoader(job.eval_loader(name, batch_size), limit)
        found = evaluate(job.task, job.step_model, loader, job.precision, job.device, seed)
        metrics.update({f"{name}/{k}" if name else k: v for k, v in found.items()})
    return metrics


def _mean_loss(task: Task, model: nn.Module, loader: Iterable[Any], precision: Precision,
               device: DeviceInfo) -> float:
    total, count = 0.0, 0
    for batch in loader:
        batch = batch_tree.move(batch, device.torch_device)
        with precision.forward_context():
            loss = task.loss(model, batch)
        total += float(loss.float().item())
        count += 1
    return total / max(count, 1)


def evaluate_shrinking(run: Callable[[int], dict[str, float]], size: int,
                       on_shrink: Callable[[int, int], None]) -> tuple[dict[str, float], int]:
    """`run(size)`, halving `size` after each out-of-memory error: (metrics, the size that
    fit). `on_shrink(old, new)` hears each change; at size 1 the error propagates."""
    while True:
        try:
            metrics = run(size)
            return {k: float(v) for k, v in metrics.items()}, size
        except torch.OutOfMemoryError:
            if size == 1:
                raise
        old, size = size, (size + 1) // 2
        on_shrink(old, size)
