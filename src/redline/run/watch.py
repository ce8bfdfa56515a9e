"""Watching a run: non-finite steps and memory growth in each window; the OOM guard's
micro-batch changes and what micro-batches do to BatchNorm (MemoryEvents).

`RunWatch` is a callback on Event.WINDOW (the trainer installs it) that reads what the
window logger tallied, so it adds nothing to a step:

- **Non-finite steps**, by `train.on_nonfinite`. `skip` (the default): the engine has
  already not applied their updates; each window with some says so in one line, and
  `train.nonfinite_patience` of them in a row (10) end the run, since a run of them is
  divergence, not a bad batch. `stop`: the first ends the run. `warn`: one line, the
  updates were applied. The first non-finite step of a run is diagnosed once: its batch is
  rebuilt from the data order and re-run on a copy of the model with hooks
  (stats.first_nonfinite), naming the first module whose output or gradient went
  non-finite. A run that ends raises errors.RunStopped: one sentence, exit 1, and the
  trainer saves the last (finite) state first.
- **Memory growth**: the window's tensor memory (the allocator's, or the CPU budget's
  tracker) or else the process's resident memory, fitted per window (telemetry/trend.py);
  a steady climb is reported once, with its slope.

A skip default, a stop after a run: isolated non-finite steps (one bad batch, a rare
overflow) cost one skipped update, while ten in a row mean the model has diverged and
further steps would only burn compute on NaN. fp16's loss scaler keeps working: its own
skips of overflowed gradients (finite loss) are not counted as non-finite, until it skips
most of them (the engine's Event.ANOMALY "scaler_skips", precision.ScalerWatch): then the
run warns at once, and its skipped steps in a row count toward the same patience (`stop`:
the first ends the run), since such an fp16 run trains nothing. Where the engine cannot
read a step's skip without a sync (a fused optimizer's flag on a GPU), the telemetry
window's counts feed the same watch a window late, and only a window skipped whole
continues a run of skips.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, default_collate

from redline import batch as batch_tree
from redline.checkpoint import checkpoint_name
from redline.config import TrainConfig
from redline.data import EpochBatchSampler
from redline.errors import RunStopped
from redline.events import Callback, State
from redline.job.build import Job
from redline.precision import ScalerWatch
from redline.stats import first_nonfinite
from redline.telemetry import schema as K
from redline.telemetry.jsonl import EventLog
from redline.telemetry.trend import growth

MEMORY_POINTS = 400  # the windows the trend is fitted over, at the most


class RunWatch(Callback):
    """See the module docstring. `locate(step)` names where that step went non-finite
    (None: not located, e.g. a sharded model, which no rank can copy and re-run alone)."""

    def __init__(self, train: TrainConfig, events: EventLog,
                 locate: Callable[[int], str | None] | None,
                 scaler: ScalerWatch | None = None, sharded: bool = False) -> None:
        """`sharded`: checkpoints are directories (the stop sentences name them so)."""
        self.sharded = sharded
        self.mode, self.patience = train.on_nonfinite, train.nonfinite_patience
        self.events, self.locate, self.scaler = events, locate, scaler
        self.diagnosed = self.warned_growth = self.warned_scaler = False
        self.memory: list[tuple[int, float]] = []
        self.window_start: int | None = None  # the step the next window's count starts at

    def on_fit_start(self, state: State) -> None:
        self.window_start = state.step

    def on_window(self, state: State, record: dict[str, Any]) -> None:
        if record.get(K.NONFINITE_STEPS):
            self._nonfinite(record, state.step)
        self._scaler_window(state, record)
        self._memory(record)

    def _scaler_window(self, state: State, record: dict[str, Any]) -> None:
        """fp16 steps whose skip the engine could not read for free (a fused optimizer's
        flag on a GPU: precision.ScalerWatch.blind_steps): the window's counts, read a
        window late with no sync of their own, feed the same watch. The scaler's skips are
        the window's skipped updates less its non-finite steps (those of a finite loss)."""
        end, start = record.get(K.STEP), self.window_start
        if end is not None:
            self.window_start = end
        if self.scaler is None or not self.scaler.blind_steps or end is None or start is None:
            return
        skipped = (record.get(K.SKIPPED_STEPS) or 0) - (record.get(K.NONFINITE_STEPS) or 0)
        info = self.scaler.add_window(end - start, max(0, skipped), end)
        if info is not None:
            self.on_anomaly(state, info)

    def _nonfinite(self, record: dict[str, Any], now: int) -> None:
        """`now`: the step the run has reached, which a stop saves (the window is read a
        step or more after its non-finite step: naming `now` keeps the sentence and the
        checkpoint in agreement)."""
        n, first, step = record[K.NONFINITE_STEPS], record[K.FIRST_NONFINITE], record[K.STEP]
        where = ""
        if not self.diagnosed:
            self.diagnosed = True
            found = self.locate(first) if self.locate is not None else None
            if self.locate is not None:
                where = (f" (re-run with the weights at step {step}: {found})" if found
                         else f" (not reproduced re-running step {first} with the weights "
                              f"at step {step})")
            self.events.event("nonfinite", step=first, where=found, mode=self.mode)
        if self.mode == "stop":
            raise RunStopped(f"the loss or gradients were not finite at step {first}{where}; "
                             f"stopped at step {now} (train.on_nonfinite: stop; the "
                             "non-finite updates were skipped) with its finite weights saved "
                             "as " + checkpoint_name(now, self.sharded))
        run = record.get(K.NONFINITE_RUN, 0)
        if self.mode == "skip" and self.patience and run >= self.patience:
            raise RunStopped(f"{run} steps in a row had non-finite loss or gradients (up to "
                             f"step {step}){where}: the run has diverged, stopped at step "
                             f"{now} (train.nonfinite_patience {self.patience}) with its finite "
                             f"weights saved as {checkpoint_name(now, self.sharded)}; lower "
                             "train.lr or fix what went non-finite")
        fate = ("their updates were skipped" if self.mode == "skip"
                else "their updates were applied (train.on_nonfinite: warn)")
        _say(self.events, f"redline: {n} step(s) with non-finite loss or gradients in the "
             f"window ending at step {step}, the first at {first}{where}; {fate}")
        self.events.event("nonfinite_window", step=step, steps=n, first=first, mode=self.mode)

    def on_anomaly(self, state: State, info: dict[str, Any]) -> None:
        if info.get("kind") != "scaler_skips":
            return
        step, run = info["step"], info["run"]
        if not self.warned_scaler:
            self.warned_scaler = True
            _say(self.events, f"redline: warning: {info['message']} (step {step})")
            self.events.event("scaler_skips", step=step, skipped=info["skipped"],
                              window=info["window"])
        if self.mode == "stop" or (self.mode == "skip" and self.patience
                                   and run >= self.patience):
            limit = ("train.on_nonfinite: stop" if self.mode == "stop"
                     else f"train.nonfinite_patience {self.patience}")
            raise RunStopped(f"fp16's loss scaler skipped {run} updates in a row (up to step "
                             f"{step}) on non-finite gradients: stopped ({limit}) with the "
                             "last finite weights saved; use bf16-mixed, lower train.lr, or "
                             "look for an inf in the loss")

    def _memory(self, record: dict[str, Any]) -> None:
        key = K.MEM_ALLOCATED if record.get(K.MEM_ALLOCATED) is not None else K.MEM_RSS
        value = record.get(key)
        if value is None or self.warned_growth:
            return
        self.memory = [*self.memory[-MEMORY_POINTS + 1:], (record[K.STEP], float(value))]
        found = growth(self.memory)
        if found is not None:
            self.warned_growth = True
            what = "tensor memory" if key == K.MEM_ALLOCATED else "the process's resident memory"
            _say(self.events, f"redline: warning: {found.sentence(what)}")
            self.events.event("memory_growth", key=key, bytes_per_1000_steps=round(
                found.per_1000_steps), first_step=found.first_step, last_step=found.last_step,
                r2=round(found.r2, 3))

    def state_dict(self) -> dict[str, Any]:
        return {"diagnosed": self.diagnosed, "warned_growth": self.warned_growth,
                "warned_scaler": self.warned_scaler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.diagnosed = bool(state.get("diagnosed"))
        self.warned_growth = bool(state.get("warned_growth"))
        self.warned_scaler = bool(state.get("warned_scaler"))


def locate_nonfinite(job: Job, loader: DataLoader, step: int) -> str | None:
    """Where `step` (1-based) went non-finite: its batch rebuilt from the data order (the
    loader's sampler), re-run with hooks on a copy of the current model."""
    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatchSampler) and job.steps_per_epoch
    epoch, index = divmod(step - 1, job.steps_per_epoch)
    samples = default_collate([job.train_set[i] for i in sampler.indices(epoch, index)])
    batch = batch_tree.move(samples, job.device.torch_device)
    return first_nonfinite(job.model, batch, job.task.loss, job.precision.forward_context)


class MemoryEvents(Callback):
    """Every micro-batch change of the OOM guard, and what micro-batches do to BatchNorm:
    a line on stderr and an event."""

    def __init__(self, events: EventLog) -> None:
        self.events = events

    def on_anomaly(self, state: State, info: dict[str, Any]) -> None:
        if info.get("kind") != "batch_statistics":
            return
        layers = info["layers"]
        _say(self.events, f"redline: note: {len(layers)} BatchNorm layer(s) "
             f"({', '.join(layers[:3])}"
             f"{', ...' if len(layers) > 3 else ''}) normalise each micro-batch of "
             f"{info['micro_batch']} with its own statistics, so a step split from "
             f"{info['batch']} samples is not the full-batch step; GroupNorm or LayerNorm "
             "are not affected")
        self.events.event("batch_statistics", **{k: v for k, v in info.items()
                                                 if k != "kind"})

    def on_micro_batch_change(self, state: State, info: dict[str, Any]) -> None:
        where = "on" if str(info["phase"]).startswith("rank") else "in"
        why = (f"after OOM {where} {info['phase']}" if info["reason"] == "oom"
               else "growing back after clean steps")
        inexact = ("; the redo draws other random numbers than the failed attempt (its "
                   "RNG began drawing unseen), so this step is not bit-exact"
                   if info.get("exact") is False else "")
        _say(self.events, f"micro-batch {info['old']} -> {info['new']} {why} at step "
             f"{info['step']}{inexact}")
        self.events.event("micro_batch", **info)


def _say(events: EventLog, text: str) -> None:
    """One line on stderr, from the rank that records the run's events (rank 0)."""
    if events.announces:
        print(text, file=sys.stderr, flush=True)
