"""Training metrics per window, at a cost the run measures itself.

On a step that does not log, the training thread records the step's loss and gradient
norm and nothing else: no host sync, no tensor kept past the step. Every
`log_every` steps the window closes and is published:

  - on CPU the loss and norm are host memory: each step reads them as Python floats
    (`.item()`, under a microsecond; there is no device to wait for) and adds them up.
    Why not keep the step's tensors until the window closes, as on a GPU: on CPU, small
    tensors kept alive across steps fragment the allocator's heap, and the big
    activations then cost page faults: +2.2 % on a 2 ms step (bench/step_costs.py);
  - on a GPU each step appends its two device tensors to a list (no kernel launch; the
    caching allocator does not fragment), and the window stacks them (one kernel). On
    CUDA the stack is copied into pinned host memory with non_blocking=True and a CUDA
    event recorded; the record is completed a window later, when that event has long
    completed, so the host never waits on the device. Step time comes from the CUDA
    events at window boundaries, not from the host clock, which runs ahead of the GPU.

The window's loss is the mean of its steps' finite losses. A step whose loss or gradient
norm is not finite is tallied off the hot path (`_Tally`): `nonfinite_steps` counts them
(a finite loss whose gradients overflowed under fp16's loss scaler is the scaler's normal
business, not counted), `skipped_steps` the updates not applied (non-finite gradients,
skipped by train.on_nonfinite or by the scaler), `nonfinite_run_max` the longest run of
consecutive non-finite steps reached in the window (counting across windows), and
`first_nonfinite_step` the first of them. Time spent here on the training
thread is measured (the clock around each call, a window's close with its WINDOW
callbacks included) and reported as `redline/overhead_pct` of the window's wall time (the
inspector adds its own time on inspecting steps in its WINDOW handler; schema.py says
what is not counted), with the number of host syncs redline itself made
(`redline/host_syncs`). A window's wall time runs from the moment the previous window's
closing call began to the moment its own closing call begins, so each call, the close
included, lies inside the wall time of the window whose overhead it counts in: the
share is at most 100 % on any step size. Time inside `paused()` (evaluation, checkpoints)
is not window time. Under torchrun a completed record first goes to `merge`, which
exchanges the ranks' figures (the window's one collective: session.py). It then goes to
`on_record` (the WINDOW event: callbacks may add to it), then to `publish`. Every key is
defined in schema.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import isfinite
from time import perf_counter
from typing import Any

import torch

from redline.telemetry import schema as K
from redline.telemetry.flops import mfu

Record = dict[str, Any]
FOLD_EVERY = 1024  # GPU: steps whose tensors are stacked into one, to keep the list short


@dataclass
class WindowContext:
    """What the logger needs to know about the run, fixed at start."""

    samples_per_step: int
    device: torch.device
    skip_nonfinite: bool = False  # the engine skips updates with non-finite gradients
    loss_scaled: bool = False  # fp16's scaler skips overflowed gradients itself
    flops_per_step: int | None = None  # counted once at start; None: unknown
    hardware_flops_per_step: int | None = None  # with recomputation; None: none recomputed
    peak_flops: float | None = None  # dense peak for the compute dtype; None: MFU empty
    peak_source: str = "unknown"
    ranks: int = 1  # under torchrun each rank steps samples_per_step / ranks


class _Tally:
    """A window's non-finite steps; the run of consecutive ones carries across windows."""

    __slots__ = ("bad_loss", "first", "last_bad", "max_run", "nonfinite", "run", "skipped")

    def __init__(self) -> None:
        self.run, self.last_bad = 0, -1
        self.reset()

    def reset(self) -> None:
        self.bad_loss = self.nonfinite = self.skipped = self.max_run = 0
        self.first: int | None = None

    def add(self, step: int, loss: float, norm: float, ctx: WindowContext) -> None:
        """A step whose loss or norm is not finite (the hot path checks both at once)."""
        loss_ok, grad_ok = math.isfinite(loss), math.isfinite(norm)
        self.bad_loss += not loss_ok
        if not grad_ok and (ctx.skip_nonfinite or ctx.loss_scaled):
            self.skipped += 1
        if loss_ok and ctx.loss_scaled:
            return  # the scaler's overflow: its business, not a non-finite step
        self.nonfinite += 1
        self.run = self.run + 1 if step == self.last_bad + 1 else 1
        self.last_bad, self.max_run = step, max(self.max_run, self.run)
        self.first = self.first if self.first is not None else step

    def fields(self) -> Record:
        return {K.SKIPPED_STEPS: self.skipped, K.NONFINITE_STEPS: self.nonfinite,
                K.NONFINITE_RUN: self.max_run, K.FIRST_NONFINITE: self.first}


class _Pending:
    """A closed window whose device values are still on their way to the host."""

    def __init__(self, values: torch.Tensor | tuple[float, float, int], record: Record,
                 event: Any | None, start_event: Any | None) -> None:
        self.values, self.record, self.event, self.start_event = (values, record, event,
                                                                  start_event)


class WindowLogger:
    """One record per `log_every` steps; see the module docstring for the cost model.

    Slots, because `record` runs every step right after the step's compute, when the
    caches are cold: there each attribute lookup costs several times what it does in a
    microbenchmark, and slots are cheaper to reach than an instance dict.
    """

    __slots__ = ("_at", "_data_wait_s", "_folded", "_host", "_loss_sum", "_n", "_norm",
                 "_pairs", "_paused", "_pending", "_start_event", "_t0", "_tally", "clock",
                 "ctx", "cuda", "host_syncs", "last", "log_every", "memory", "merge", "on_record",
                 "overhead_s", "publish")

    def __init__(self, log_every: int, ctx: WindowContext, publish: Callable[[Record], None],
                 memory: Callable[[], Record] | None = None,
                 on_record: Callable[[Record], None] | None = None,
                 host_reads: bool | None = None,
                 clock: Callable[[], float] = perf_counter,
                 merge: Callable[[Record], None] | None = None) -> None:
        """`host_reads`: read each step's values as floats (None: where they are host
        memory, i.e. on CPU), or keep them as tensors until the window closes (what a GPU
        does; False forces it on CPU too). `clock`: seconds, for the window's wall time
        and redline's own share of it."""
        self.clock = clock
        self.log_every, self.ctx, self.publish = log_every, ctx, publish
        self.memory, self.on_record, self.merge = memory, on_record, merge
        self.cuda = ctx.device.type == "cuda"
        self.last: Record = {}
        self.overhead_s = 0.0
        self.host_syncs = 0
        # CPU: the window's sums as Python numbers; a device: the steps' tensors.
        self._host = ctx.device.type == "cpu" if host_reads is None else host_reads
        self._loss_sum, self._norm = 0.0, 0.0
        self._tally = _Tally()
        self._pairs: list[torch.Tensor] = []
        self._folded: list[torch.Tensor] = []  # _pairs stacked every FOLD_EVERY steps
        self._n = 0  # steps in the open window
        self._data_wait_s = 0.0
        # where the last recorded step left the run: step, micro-batch, lr, epoch, samples
        self._at: tuple[int, int | None, float | None, int, int] = (0, None, None, 0, 0)
        self._t0 = clock()
        self._start_event: Any = None
        self._pending: _Pending | None = None
        self._paused = False  # evaluation or a checkpoint ran inside this window

    def start(self) -> None:
        self._t0 = self.clock()
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
               micro_batch: int | None, lr: float | None, epoch: int, samples: int,
               data_wait_s: float, last: bool) -> None:
        """One finished step (positional arguments: this runs every step). `last` closes
        the window whatever the step."""
        t = self.clock()
        self._at = (step, micro_batch, lr, epoch, samples)
        self._data_wait_s += data_wait_s
        if self._host:
            # Plain .item(): inside a step it measured cheaper than reading the memory
            # through ctypes (0.35 against 1.8 us a value) or any op that keeps the value
            # in a tensor. On CPU it waits for nothing.
            value = loss.item()
            norm = self._norm = grad_norm.item()
            if isfinite(value + norm):  # both finite (inf - inf and nan are not)
                self._loss_sum += value
            else:
                self._tally.add(step, value, norm, self.ctx)
                if isfinite(value):
                    self._loss_sum += value
        else:
            self._pairs += (loss, grad_norm)
            if len(self._pairs) == 2 * FOLD_EVERY:
                self._folded.append(torch.stack(self._pairs).float())
                self._pairs = []
        self._n += 1
        if step % self.log_every == 0 or last:
            self._close_window(t)
        self.overhead_s += self.clock() - t

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not window time (evaluation, checkpoints)."""
        t = self.clock()
        try:
            yield
        finally:
            self.exclude(self.clock() - t)

    def exclude(self, seconds: float) -> None:
        """Take `seconds` that were not training out of the open window's wall time."""
        self._t0 += seconds
        self._paused = True

    def _close_window(self, now: float) -> None:
        steps, self._n = self._n, 0
        values: torch.Tensor | tuple[float, float, Record, int]
        if self._host:
            values = (self._loss_sum, self._norm, self._tally.fields(), self._tally.bad_loss)
            self._loss_sum = 0.0
            self._tally.reset()
        else:
            parts = [*self._folded, *([torch.stack(self._pairs).float()] if self._pairs else [])]
            values = torch.cat(parts).view(steps, 2)
            self._pairs, self._folded = [], []
        wall = now - self._t0
        step, micro, lr, epoch, samples = self._at
        share = self.ctx.samples_per_step // self.ctx.ranks
        micro = micro or share
        record: Record = {
            K.STEP: step, K.EPOCH: epoch, K.SAMPLES: samples, K.LR: lr,
            "window_steps": steps, "wall_s": wall, "paused": self._paused,
            K.DATA_WAIT_PCT: 100.0 * self._data_wait_s / wall if wall > 0 else None,
            K.MICRO_BATCH: micro, K.EFFECTIVE_BATCH: self.ctx.samples_per_step,
            K.ACCUMULATION_STEPS: math.ceil(share / micro),
            K.OVERHEAD_PCT: 100.0 * self.overhead_s / wall if wall > 0 else None,
            K.HOST_SYNCS: self.host_syncs,
        }
        if self.memory is not None:
            record.update(self.memory())
        self._data_wait_s = self.overhead_s = 0.0
        self.host_syncs = 0
        self._paused = False
        if self.cuda:
            assert isinstance(values, torch.Tensor)
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            ready, self._pending = self._pending, _Pending(host, record, end,
                                                           self._start_event)
            self._start_event = end
            if ready is not None:
                self._emit(ready)
        else:
            self._emit(_Pending(values, record, None, None))
        # The next window began when this close did: the close is its time, and the
        # record call that made it counts in its overhead (see the module docstring).
        self._t0 = now

    def _emit(self, p: _Pending) -> None:
        """Complete a window's record from its (now host-side) values and publish it."""
        if p.event is not None and not p.event.query():
            p.event.synchronize()  # only if the device is a whole window behind
            self.host_syncs += 1
        r = p.record
        steps, wall, paused = r.pop("window_steps"), r.pop("wall_s"), r.pop("paused")
        if isinstance(p.values, tuple):  # CPU: summed as the steps ran
            loss_sum, grad_norm, tally, bad_loss = p.values
        else:
            pairs = p.values.tolist()
            first = r[K.STEP] - steps + 1
            for i, (value, norm) in enumerate(pairs):
                if not math.isfinite(value + norm):
                    self._tally.add(first + i, value, norm, self.ctx)
            loss_sum = math.fsum(v for v, _ in pairs if math.isfinite(v))
            grad_norm = pairs[-1][1]
            tally, bad_loss = self._tally.fields(), self._tally.bad_loss
            self._tally.reset()
        # Device time between boundary events, unless evaluation or a checkpoint ran in
        # between: then the host clock, from which their time was taken out.
        on_device = p.event is not None and p.start_event is not None and not paused
        step_time = (p.start_event.elapsed_time(p.event) / 1000.0 / steps if on_device
                     else wall / steps)
        finite = steps - bad_loss
        r.update({K.LOSS: loss_sum / finite if finite else math.nan, K.GRAD_NORM: grad_norm,
                  **tally, K.STEP_TIME: step_time,
                  K.SAMPLES_PER_S: self.ctx.samples_per_step / step_time if step_time else None,
                  K.MFU: mfu(self.ctx.flops_per_step, step_time, self.ctx.peak_flops),
                  **({K.HFU: mfu(self.ctx.hardware_flops_per_step, step_time,
                                 self.ctx.peak_flops)}
                     if self.ctx.hardware_flops_per_step is not None else {}),
                  K.PEAK_FLOPS: self.ctx.peak_flops, K.TIME: round(time.time(), 3)})
        r["window_steps"] = steps  # for merge; gone before the record is seen
        if self.merge is not None:
            self.merge(r)
        del r["window_steps"]
        try:  # a handler may stop the run (watch.py): the window is published all the same
            if self.on_record is not None:
                self.on_record(r)
        finally:
            self.last = r
            self.publish(r)

    def finish(self) -> None:
        """Close the open window and publish any window still waiting for the device."""
        if self._n:
            self._close_window(self.clock())
        if self._pending is not None:
            self._emit(self._pending)
            self._pending = None
