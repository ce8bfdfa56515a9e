"""What the framework callbacks share: a redline run directory fed from someone else's loop.

Lightning and the Hugging Face Trainer own their loops; their callbacks (lightning.py,
transformers.py) translate hooks into the calls below, so a framework run gets the same
run directory as `redline train` (config.yaml, environment.json, metrics.jsonl,
system.jsonl, events.jsonl) from the same Telemetry object: windows of `log_every`
optimizer steps with no host sync on the steps between, the writer process and its
hardware sampler, MFU against the device's peak, `redline/overhead_pct`. So `redline doctor
RUN_DIR` and `redline report RUN_DIR` read it like any other run.

    recorder = RunRecorder(run_dir, TelemetryConfig(), framework="lightning", ...)
    recorder.start(settings, max_steps=..., samples_per_step=...)   # rank 0 only
    recorder.count_flops_of_next_step()   # around the first real step: FlopCounterMode
    recorder.step(step, loss, grad_norm, ...)                        # each optimizer step
    recorder.evaluation(step, {"loss": ...})
    recorder.finish()

FLOPs are counted on the first real training step with torch's FlopCounterMode (the
framework's step cannot be re-run on fake tensors from outside), which slows that one step.
The gradient norm is computed by the callback before the optimizer steps, as a device
tensor (one foreach kernel; no sync), on the steps that close a window only: it is the
norm a window reports (its last step's), and a pass over every gradient each step measured
+9 % on a 9 ms Lightning step on CPU (bench/integrations_overhead.py). A non-finite step
in between is still counted through its loss. Only the process of global rank 0 records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from redline.device import DeviceInfo
from redline.run import rundir
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.jsonl import EventLog
from redline.telemetry.session import Telemetry


class RunRecorder:
    """One framework run's redline run directory (module docstring)."""

    def __init__(self, run_dir: str | Path | None, config: TelemetryConfig | None,
                 framework: str, device: DeviceInfo | str = "auto",
                 peak_flops: float | None = None) -> None:
        self.path = Path(run_dir) if run_dir else None
        self.config = config or TelemetryConfig()
        if peak_flops is not None:
            self.config = dataclasses.replace(self.config, peak_flops=peak_flops)
        self.framework = framework
        self.device = device if isinstance(device, DeviceInfo) else DeviceInfo.detect(device)
        self.telemetry: Telemetry | None = None
        self._held = contextlib.ExitStack()
        self._flops: Any = None
        self._last_step_end = time.perf_counter()

    @property
    def run_dir(self) -> Path:
        assert self.path is not None, "start() makes the run directory"
        return self.path

    def start(self, settings: dict[str, Any], *, max_steps: int, samples_per_step: int,
              compute_dtype: str = "float32", progress: bool = False, ranks: int = 1) -> None:
        """Claim the run directory, write its start files, start telemetry; `ranks`: the
        framework's processes, which share `samples_per_step`."""
        self.path, _ = rundir.lock(self.path, self.framework, self._held)
        settings = {"framework": self.framework, **settings}  # a framework's objects: str
        rundir.write_config(self.path, json.loads(json.dumps(settings, default=str)))
        rundir.write_environment(self.path, self.device.kind,
                                 {"framework": self.framework, "max_steps": max_steps})
        self.events = self._held.enter_context(EventLog(self.path / "events.jsonl"))
        self.telemetry = Telemetry(self.path, self.config, device=self.device,
                                   samples_per_step=samples_per_step, max_steps=max_steps,
                                   compute_dtype=compute_dtype, events=self.events,
                                   progress=progress, run_name=self.path.name, ranks=ranks)
        self._held.callback(self.telemetry.close)
        self.events.event("run_start", step=0, max_steps=max_steps, framework=self.framework,
                          device=self.device.name)
        self.telemetry.start(0)
        self._last_step_end = time.perf_counter()

    def closes_window(self, step: int) -> bool:
        """Whether optimizer step `step` ends a telemetry window (its gradient norm is the
        one reported: the callbacks compute it on those steps only)."""
        assert self.telemetry is not None
        return step % self.config.log_every == 0 or step == self.telemetry.max_steps

    def count_flops_of_next_step(self) -> None:
        """Count the FLOPs of the step about to run (until `step` is called)."""
        from torch.utils.flop_counter import FlopCounterMode

        self._flops = FlopCounterMode(display=False)
        self._flops.__enter__()

    def batch_start(self) -> float:
        """The host time since the last step ended: the loader's wait, roughly (the
        framework's own bookkeeping between hooks is in it too)."""
        return time.perf_counter() - self._last_step_end

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None,
             micro_batch: int | None, lr: float | None, epoch: int, samples: int,
             data_wait_s: float, accumulation: int = 1) -> None:
        """One finished optimizer step; device tensors stay on the device."""
        assert self.telemetry is not None, "start() first"
        if self._flops is not None:
            self._flops.__exit__(None, None, None)
            flops, self._flops = self._flops.get_total_flops(), None
            # this rank's step, as every rank's: MFU divides by all ranks' peak
            self.telemetry.set_flops(int(flops * accumulation * self.telemetry.ranks)
                                     if flops else None)
        norm = grad_norm if grad_norm is not None else self._no_norm(loss.device)
        self.telemetry.record_step(step, loss.detach(), norm, micro_batch, lr, epoch, samples,
                                   data_wait_s)
        self._last_step_end = time.perf_counter()

    @functools.cache  # noqa: B019 (one recorder per run: the cache dies with it)
    def _no_norm(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((), device=device)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.telemetry is not None and metrics:
            with self.telemetry.paused():
                self.telemetry.record_eval(step, metrics)
                self.events.event("eval", step=step, **metrics)

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """A block whose time is not step time (the framework's validation, checkpoints)."""
        return self.telemetry.paused() if self.telemetry else contextlib.nullcontext()

    def finish(self, step: int) -> None:
        """The run ended at `step`: publish the last window, stop the writer, unlock."""
        if self.telemetry is None:
            return
        if self._flops is not None:
            self._flops.__exit__(None, None, None)
            self._flops = None
        # the writer stopped first: a note it sends while closing (a tracker that never
        # started, the sampler's last word) is in events.jsonl before run_end, the last event
        self.telemetry.close()  # closing again with the rest below is harmless
        self.events.event("run_end", step=step)
        self._held.close()
        self.telemetry = None


def telemetry_config(config: TelemetryConfig | None, log_every: int | None,
                     trackers: tuple[str, ...] | None) -> TelemetryConfig:
    """The callbacks' telemetry section: `config`, with `log_every` / `trackers` given alone
    taking precedence (validated like the YAML's)."""
    config = config or TelemetryConfig()
    if log_every is not None:
        config = dataclasses.replace(config, log_every=log_every)
    if trackers is not None:
        config = dataclasses.replace(config, trackers=tuple(trackers))
    return config


def grad_norm(parameters: Any) -> torch.Tensor | None:
    """The global gradient norm as a device tensor (one foreach kernel, no host read)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    with torch.no_grad():
        return torch.nn.utils.get_total_norm(grads, foreach=True)
