"""Windowed training metrics: accumulate on the device, read once per `log_every` steps.

On steps that do not log, nothing here touches the host: the loss is added to a device
tensor. At a window boundary the window's sums are read (one host sync per window), the
wall time of the window gives step time and samples/s, and one record goes to each sink.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from redline.events import Callback, State


class MetricsSink(Protocol):
    def log_metrics(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLogger(Callback):
    """Turns per-step device losses into one record per window for every sink."""

    def __init__(self, log_every: int, samples_per_step: int, sinks: list[MetricsSink],
                 engine: Any = None) -> None:
        self.log_every = log_every
        self.samples_per_step = samples_per_step
        self.sinks = sinks
        self.engine = engine
        self.last: dict[str, Any] = {}
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0
        self._t0 = 0.0

    def on_fit_start(self, state: State) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, state: State, loss: torch.Tensor) -> None:
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1
        if state.step % self.log_every == 0 or state.step >= state.max_steps:
            self.flush(state)

    def flush(self, state: State) -> None:
        """Close the current window: one host read, one record to each sink."""
        if self._loss_sum is None:
            return
        loss = float(self._loss_sum.item()) / self._steps  # the window's one sync
        now = time.perf_counter()
        step_time = (now - self._t0) / self._steps
        record: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "samples": state.samples_seen,
            "loss": loss,
            "lr": state.optimizer.param_groups[0]["lr"] if state.optimizer else None,
            "step_time_s": step_time,
            "samples_per_s": self.samples_per_step / step_time if step_time > 0 else None,
        }
        if self.engine is not None:
            record["grad_norm"] = float(self.engine.grad_norm.item())
            record["nonfinite_steps"] = int(self.engine.nonfinite_steps.item())
        self.last = record
        for sink in self.sinks:
            sink.log_metrics(record)
        self._loss_sum, self._steps = None, 0
        self._t0 = time.perf_counter()  # sink time is not step time

    def on_eval_end(self, state: State, metrics: dict[str, float]) -> None:
        record = {"step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}}
        record["eval/time_s"] = state.extra.get("eval_time_s", 0.0)
        for sink in self.sinks:
            sink.log_metrics(record)
        self._t0 += record["eval/time_s"]  # evaluation time is not step time

    def on_checkpoint_saved(self, state: State, path: str) -> None:
        self._t0 += state.extra.get("checkpoint_time_s", 0.0)

    def on_fit_end(self, state: State) -> None:
        self.flush(state)
        for sink in self.sinks:
            sink.close()
