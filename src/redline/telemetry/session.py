"""Everything a run records, wired once: hub and sinks, window metrics, sampler, MFU.

The trainer builds one TelemetrySession at start and closes it at the end. In the training
process it is callbacks (the window logger, the progress bar) and the hub's end of a pipe;
the sinks and the hardware sampler run in the telemetry writer process (hub.py says why).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from redline.config import TelemetryConfig
from redline.device import DeviceInfo
from redline.engine import move_to
from redline.events import Callback
from redline.telemetry.console import Progress
from redline.telemetry.flops import count_step_flops, peak_flops
from redline.telemetry.hub import Hub, report_sink_failure
from redline.telemetry.jsonl import EventLog
from redline.telemetry.metrics import MetricsLogger, WindowContext
from redline.telemetry.sampler import torch_gpu_uuid
from redline.telemetry.sinks import check_installed


class TelemetrySession:
    """Hub, sinks, window logger, progress bar and sampler of one run."""

    def __init__(self, cfg: TelemetryConfig, run_dir: Path, device: DeviceInfo,
                 compute_dtype: str, engine: Any, events: EventLog, *, max_steps: int,
                 samples_per_step: int, memory_total: int | None,
                 tracker: Callable[[], Any], progress: bool | None,
                 tracker_run_id: str | None = None, run_name: str | None = None) -> None:
        self.events = events
        # No mode in the config: W&B's own rule (WANDB_MODE, else online).
        mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        check_installed(cfg.trackers)  # a tracker asked for but not installed: name the extra

        def failed(name: str, why: str) -> None:  # every sink failure: one line, one event
            report_sink_failure(name, why)
            events.event("sink_failed", sink=name, reason=why)

        self.progress = Progress(max_steps, interactive=progress) if progress is not False \
            else None
        uuid = torch_gpu_uuid(device.index or 0) if device.is_cuda else None
        sampler = {"kind": device.kind, "index": device.index, "uuid": uuid, "pid": os.getpid(),
                   "every_s": cfg.system_every_s, "slow_every_s": 5 * cfg.system_every_s}
        # Every sink and the sampler live in the writer process (hub.py says why).
        self.hub = Hub(cfg.trackers, run_dir, on_failure=failed, sampler=sampler,
                       on_note=lambda note: events.event("note", message=note),
                       options={"wandb_mode": mode, "wandb_project": cfg.wandb_project,
                                "wandb_run_id": tracker_run_id, "run_name": run_name})
        self.tracker_run_id = self.hub.run_id
        self.cfg, self.device, self.compute_dtype = cfg, device, compute_dtype
        self.ctx = WindowContext(samples_per_step=samples_per_step,
                                 device=device.torch_device, memory_total=memory_total)
        self.metrics = MetricsLogger(cfg.log_every, self.ctx, self._publish, engine,
                                     memory_probe=_memory_probe(device, memory_total, tracker))

    def _publish(self, stream: str, record: dict[str, Any]) -> None:
        self.hub.publish(stream, record)
        if self.progress is not None and stream == "metrics":
            self.progress.log_metrics(record)

    @property
    def callbacks(self) -> list[Callback]:
        return [self.metrics, *([self.progress] if self.progress else [])]

    def count_flops(self, model: torch.nn.Module, dataset: Dataset, micro_batch: int,
                    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                    flops_per_sample: Callable[[], float] | None = None) -> None:
        """FLOPs of one optimizer step, counted once, and the peak MFU is measured against.

        A task that declares `flops_per_sample()` (e.g. from analytic_transformer_flops,
        for sequence models whose shapes vary) is taken at its word; otherwise the first
        micro-batch's forward and backward are counted on fake tensors.
        """
        peak, source = peak_flops(self.device, self.compute_dtype, self.cfg.peak_flops)
        self.ctx.peak_flops, self.ctx.peak_source = peak, source
        if flops_per_sample is not None:
            self.ctx.flops_per_step = int(flops_per_sample() * self.ctx.samples_per_step)
        else:
            n = min(micro_batch, len(dataset))  # type: ignore[arg-type]
            batch = move_to(default_collate([dataset[i] for i in range(n)]),
                            self.device.torch_device)
            flops = count_step_flops(model, batch, loss_fn)
            if flops:
                self.ctx.flops_per_step = int(flops * self.ctx.samples_per_step / n)
        self.events.event("flops", flops_per_step=self.ctx.flops_per_step,
                          peak_flops=peak, peak_source=source, dtype=self.compute_dtype)

    def close(self) -> None:
        self.hub.close()


def _memory_probe(device: DeviceInfo, total: int | None, tracker: Callable[[], Any]
                  ) -> Callable[[], dict[str, Any]]:
    """Memory of the window, read once per window from the allocator (no device sync)."""
    def cuda() -> dict[str, Any]:
        dev = device.torch_device
        peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return {"mem_allocated_bytes": torch.cuda.memory_allocated(dev),
                "mem_reserved_bytes": torch.cuda.memory_reserved(dev),
                "mem_peak_bytes": peak, "mem_pct": 100.0 * peak / total if total else None}

    def cpu() -> dict[str, Any]:
        t = tracker()
        if t is None:  # no budget: the sampler's process RSS is the CPU's memory figure
            return {}
        peak = t.peak
        t.reset_peak()
        return {"mem_allocated_bytes": t.current, "mem_peak_bytes": peak,
                "mem_pct": 100.0 * peak / total if total else None}

    return cuda if device.is_cuda else cpu
