"""Telemetry: what a run records, for any training loop, fed with explicit values.

The trainer uses it, and so can your own loop (docs/architecture.md has the guide):

    telemetry = Telemetry("runs/mine", TelemetryConfig(trackers=("jsonl", "tensorboard")),
                          device="cpu", samples_per_step=64, max_steps=1000)
    with telemetry:                                     # start ... close
        for step, batch in enumerate(loader, start=1):
            loss = engine.step(batch, loss_fn)
            telemetry.record_step(step, loss, engine.grad_norm,
                                  micro_batch=engine.micro_batch_size,
                                  lr=scheduler.get_last_lr()[0])
            if step % 500 == 0:
                with telemetry.paused():                # not step time
                    telemetry.record_eval(step, evaluate(model))

In the training process it is the window logger (metrics.py: no host sync on a step
that does not log), the progress display and the hub's end of a pipe; the sinks and the
hardware sampler run in the telemetry writer process (hub.py says why).

Under torchrun (a `comm` of several ranks) every rank keeps its own windows, and each
window's figures are exchanged in one all-gather when it closes (never on a step that
does not log): every rank then sees the same record, the loss averaged over the ranks,
the slowest rank named, so a callback that stops the run decides the same everywhere.
The figures carry whether the rank was asked to stop (the `requested()` the trainer gives
`stop_when`): `stop_agreed` is then True on every rank after the same step.
Rank 0 alone publishes it, with each rank's figures (the `ranks` stream, ranks.jsonl);
the other ranks start no writer process. FLOPs are counted on rank 0 and sent once; MFU
divides by the peak of all ranks' devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from redline.device import DeviceInfo
from redline.distributed import Comm, World
from redline.telemetry import schema as K
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.flops import measure_step_flops, peak_flops
from redline.telemetry.hub import Hub, QuietHub, report_sink_failure
from redline.telemetry.jsonl import EventLog
from redline.telemetry.metrics import Record, WindowContext, WindowLogger
from redline.telemetry.process import ProcessMemory
from redline.telemetry.progress import Progress
from redline.telemetry.sampler import torch_gpu_uuid
from redline.telemetry.sinks import check_installed

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class Telemetry:
    """The windows, trackers, hardware samples, MFU and progress display of one run.

    `run_id` names the tracker run (W&B's id) this run writes to: pass a resumed run's to
    continue it; None lets the tracker choose. `memory_total` is what `mem_pct` divides by
    (memory.budget, or the device's memory);
    `memory_tracker()`, when given, returns the CPU budget's MemoryTracker (or None), whose
    counts become the window's tensor-memory figures. `on_window(record)` sees each
    completed window record before it is published and may add keys to it.
    `skip_nonfinite` and `loss_scaled` say how non-finite steps are handled (the engine's
    skip, fp16's scaler), so `skipped_steps` counts the updates really not applied.
    `labels` are added to every window record (e.g. precision/emulated). `comm`: the
    ranks under torchrun (module docstring); `sync_wait()` the seconds this rank has
    waited for the others so far (Engine.sync_wait_s; None where nothing measures it).
    `ranks`: the processes that share each step's samples, where another framework runs
    them (a Lightning or HF callback on rank 0; default: the comm's ranks).
    """

    def __init__(self, run_dir: str | Path, config: TelemetryConfig | None = None, *,
                 samples_per_step: int, device: DeviceInfo | str = "auto",
                 max_steps: int | None = None, compute_dtype: str = "float32",
                 memory_total: int | None = None,
                 memory_tracker: Callable[[], Any] | None = None,
                 events: EventLog | None = None, progress: bool | None = False,
                 run_id: str | None = None, run_name: str | None = None, start_step: int = 0,
                 on_window: Callable[[Record], None] | None = None,
                 skip_nonfinite: bool = False, loss_scaled: bool = False,
                 labels: Record | None = None, comm: Comm | None = None,
                 sync_wait: Callable[[], float | None] | None = None,
                 ranks: int | None = None) -> None:
        cfg = config or TelemetryConfig()
        self.comm = comm or Comm(World())
        self.ranks = ranks or self.comm.world.size
        self._sync_wait: Callable[[], float | None] = sync_wait or (lambda: None)
        self._sync_seen = 0.0
        quiet = not self.comm.world.main
        self._stop_requested: Callable[[], bool] = lambda: False  # see stop_when
        self.stop_agreed = False
        self.labels = dict(labels or {})
        self.config, self.run_dir = cfg, Path(run_dir)
        self.device = device if isinstance(device, DeviceInfo) else DeviceInfo.detect(device)
        self.compute_dtype, self.max_steps = compute_dtype, max_steps
        self._own_events = events is None
        self.events = events or EventLog(self.run_dir / "events.jsonl")
        check_installed(cfg.trackers)  # a tracker asked for but not installed: name the extra
        self.progress = (Progress(max_steps, interactive=progress)
                         if progress is not False and max_steps and not quiet else None)
        uuid = torch_gpu_uuid(self.device.index or 0) if self.device.is_cuda else None
        sampler = {"kind": self.device.kind, "index": self.device.index, "uuid": uuid,
                   "pid": os.getpid(), "every_s": cfg.system_every_s,
                   "slow_every_s": 5 * cfg.system_every_s}
        # Every sink and the sampler live in the writer process (hub.py says why).
        # the writer runs in this process's directory: a sink file's path means the same there
        self.hub: Hub | QuietHub = QuietHub() if quiet else Hub(
            list(cfg.trackers), self.run_dir, on_failure=self._sink_failed, sampler=sampler,
            on_note=lambda note: self.events.event("note", message=note),
            options=cfg.sink_options, run_id=run_id, start_step=start_step,
            run_name=run_name or self.run_dir.name)
        self.ctx = WindowContext(samples_per_step=samples_per_step,
                                 device=self.device.torch_device,
                                 skip_nonfinite=skip_nonfinite, loss_scaled=loss_scaled,
                                 ranks=self.ranks)
        memory = _memory_reader(self.device, memory_total, memory_tracker)
        self.window = WindowLogger(cfg.log_every, self.ctx, self._publish_window, memory,
                                   on_record=on_window,
                                   merge=self._merge_ranks if self.comm.world.distributed
                                   else None)

    # ---- the run -------------------------------------------------------------------------

    @property
    def tracker_run_id(self) -> str | None:
        """The tracker's run id (W&B's), kept in checkpoints so a resume continues it."""
        return self.hub.run_id

    @property
    def last(self) -> Record:
        """The last published window record."""
        return self.window.last

    def start(self, step: int = 0) -> None:
        """The loop begins at `step` (a resumed run's step); window timing starts now."""
        self.window.start()
        if self.progress is not None:
            self.progress.start(step)

    def record_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                    micro_batch: int | None = None, lr: float | None = None, epoch: int = 0,
                    samples: int | None = None, data_wait_s: float = 0.0) -> None:
        """One finished optimizer step. `loss` and `grad_norm` stay device tensors; on a
        step that does not close a window nothing is read from the device. `samples`
        defaults to step x samples_per_step; `data_wait_s` is how long the loader took."""
        self.window.record(step, loss, grad_norm, micro_batch, lr, epoch,
                           step * self.ctx.samples_per_step if samples is None else samples,
                           data_wait_s,
                           step == self.max_steps)
        if self.progress is not None:
            self.progress.step(step)

    def record_eval(self, step: int, metrics: dict[str, float], time_s: float | None = None
                    ) -> None:
        """An evaluation's metrics, as one `eval/*` row."""
        row: Record = {K.STEP: step, K.TIME: round(time.time(), 3),
                       **{f"{K.EVAL_PREFIX}{k}": v for k, v in metrics.items()}}
        if time_s is not None:
            row[K.EVAL_TIME] = time_s
        self._publish(row)
        if self.progress is not None:
            self.progress.show(row)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """A row of your own metrics at your own cadence (e.g. a second evaluation set)."""
        self._publish({K.STEP: step, K.TIME: round(time.time(), 3), **values})

    def samples(self, step: int, entries: list[dict[str, Any]]) -> None:
        """A run's saved samples (samples.read_samples' entries) for the trackers that show
        them (W&B: images and a table); the run directory's samples/ folder holds them."""
        self.hub.publish("samples", {K.STEP: step, "samples": entries})

    def histograms(self, step: int, entries: list[dict[str, Any]]) -> None:
        """Histograms (name, min, max, num, sum, sum_squares, edges, counts) for the
        trackers that draw them (TensorBoard, W&B); the jsonl files do not keep them."""
        self.hub.publish("histograms", {K.STEP: step, "histograms": entries})

    def stop_when(self, requested: Callable[[], bool]) -> None:
        """Send `requested()` (this rank was asked to stop) with each window's figures;
        `stop_agreed` turns True on every rank at the same window once any rank was."""
        self._stop_requested = requested

    def paused(self) -> Any:
        """A block whose time is not step time (evaluation, checkpoints)."""
        return self.window.paused()

    def count_flops(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn,
                    samples: int, device: torch.device | None = None) -> int | None:
        """Model FLOPs of one optimizer step from a batch of `samples` (counted once, on
        fake tensors; recomputation left out, and counted apart for HFU), and the peak MFU
        is measured against; recorded as a 'flops' event. Rank 0 counts, alone: `model`
        must run without collectives (a sharded model's unsharded twin on the meta device,
        counted on `device`: flops.measure_step_flops)."""
        counted = self.comm.from_main(lambda: measure_step_flops(model, batch, loss_fn,
                                                                 device))
        if counted is None:
            return self.set_flops(None)
        scale = self.ctx.samples_per_step / samples
        return self.set_flops(int(counted.total * scale), int(counted.hardware * scale))

    def set_flops(self, flops_per_step: int | None,
                  hardware_flops_per_step: int | None = None) -> int | None:
        """FLOPs of one optimizer step as the task declares them (e.g. analytic), or as
        counted: model FLOPs, and those the device ran with recomputation (HFU's, kept
        only when more than the model FLOPs)."""
        peak, source = peak_flops(self.device, self.compute_dtype, self.config.peak_flops)
        ranks = self.ranks
        peak = peak * ranks if peak else peak  # every rank's device works on the step
        hardware = (hardware_flops_per_step if flops_per_step and hardware_flops_per_step
                    and hardware_flops_per_step > flops_per_step else None)
        self.ctx.flops_per_step, self.ctx.peak_flops, self.ctx.peak_source = (
            flops_per_step, peak, source)
        self.ctx.hardware_flops_per_step = hardware
        self.events.event("flops", flops_per_step=flops_per_step, peak_flops=peak,
                          peak_source=source, dtype=self.compute_dtype,
                          **({"hardware_flops_per_step": hardware} if hardware else {}),
                          **({"ranks": ranks} if ranks > 1 else {}))
        return flops_per_step

    def finish(self) -> None:
        """Publish the open window (and one still waiting for the device)."""
        self.window.finish()
        if self.progress is not None:
            self.progress.close()

    def close(self) -> None:
        """Finish, write everything, stop the writer process. Safe to call twice."""
        self.finish()
        self.hub.close()
        if self._own_events:
            self.events.close()

    def __enter__(self) -> Telemetry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------

    def _sink_failed(self, name: str, why: str) -> None:  # every failure: one line, one event
        report_sink_failure(name, why)
        self.events.event("sink_failed", sink=name, reason=why)

    def _publish_window(self, record: Record) -> None:
        record.update(self.labels)
        self._publish(record)
        if self.progress is not None:
            self.progress.show(record)

    def _publish(self, record: Record) -> None:
        self.hub.publish("metrics", record)

    def _merge_ranks(self, record: Record) -> None:
        """The window's one collective: every rank's figures, merged into `record` the
        same way on every rank (module docstring)."""
        world = self.comm.world
        steps, step_time = record["window_steps"], record.get(K.STEP_TIME) or 0.0
        total = self._sync_wait()
        waited = None if total is None else total - self._sync_seen
        self._sync_seen = total or 0.0
        wall = step_time * steps
        mine: Record = {K.STEP: record[K.STEP], K.RANK: world.rank,
                        K.STEP_TIME: step_time, K.LOSS: record.get(K.LOSS),
                        K.SYNC_WAIT_PCT: (100.0 * waited / wall if wall > 0 and waited
                                          is not None else None),
                        K.SAMPLES_PER_S: (self.ctx.samples_per_step / world.size / step_time
                                          if step_time else None)}
        mine.update({k: record.get(k) for k in (K.MICRO_BATCH, K.DATA_WAIT_PCT, K.OVERHEAD_PCT,
                                                K.MEM_PEAK, K.MEM_RSS, K.MEM_PCT)
                     if record.get(k) is not None})
        mine["stop"] = int(self._stop_requested())
        ranks = self.comm.all_gather(mine)
        self.stop_agreed = self.stop_agreed or any(r.pop("stop") for r in ranks)
        losses = [r[K.LOSS] for r in ranks if r.get(K.LOSS) is not None
                  and r[K.LOSS] == r[K.LOSS]]
        record[K.LOSS] = sum(losses) / len(losses) if losses else float("nan")
        record[K.WORLD_SIZE] = world.size
        waits = [r.get(K.SYNC_WAIT_PCT) for r in ranks]
        if all(w is not None for w in waits):  # measured where the ranks agree each step
            busy = [r[K.STEP_TIME] * (1 - w / 100) for r, w in zip(ranks, waits, strict=True)]
            record.update({
                K.SLOWEST_RANK: waits.index(min(waits)), K.SYNC_WAIT_MAX: max(waits),
                K.STEP_TIME_SPREAD: (100.0 * (max(busy) / min(busy) - 1) if min(busy) > 0
                                     else None)})
        for r in ranks:
            r[K.TIME] = record.get(K.TIME)
            self.hub.publish("ranks", r)


def _memory_reader(device: DeviceInfo, total: int | None, tracker: Callable[[], Any] | None
                   ) -> Callable[[], Record]:
    """The window's memory figures, read once per window (no device sync)."""
    if device.is_cuda:
        dev = device.torch_device

        def cuda() -> Record:
            peak = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            return {K.MEM_ALLOCATED: torch.cuda.memory_allocated(dev),
                    K.MEM_RESERVED: torch.cuda.memory_reserved(dev), K.MEM_PEAK: peak,
                    K.MEM_PCT: 100.0 * peak / total if total else None}

        return cuda

    process = ProcessMemory()

    def cpu() -> Record:
        rss, rss_peak = process.read()
        record: Record = {K.MEM_RSS: rss, K.MEM_RSS_PEAK: rss_peak}
        t = tracker() if tracker is not None else None
        if t is not None:  # a memory.budget: the tracker's count is what the budget holds
            peak = t.peak
            t.reset_peak()
            record.update({K.MEM_ALLOCATED: t.current, K.MEM_PEAK: peak})
        else:  # the resident size now: the lifetime high-water mark would never come down
            peak = rss
        record[K.MEM_PCT] = 100.0 * peak / total if total and peak else None
        return record

    return cpu
