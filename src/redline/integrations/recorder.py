"""What the framework callbacks share: a redline run directory fed from someone else's loop.

Lightning and the Hugging Face Trainer own their loops; their callbacks (lightning.py,
transformers.py) translate hooks into the calls below, so a framework run gets the same
run directory as `redline train` (config.yaml, environment.json, metrics.jsonl,
system.jsonl, events.jsonl, stats/) from the same Telemetry object: windows of `log_every`
optimizer steps with no host sync on the steps between, the writer process and its
hardware sampler, MFU against the device's peak, `redline/overhead_pct`. So `redline doctor
RUN_DIR` and `redline report RUN_DIR` read it like any other run.

    recorder = RunRecorder(run_dir, TelemetryConfig(), framework="lightning", ...)
    recorder.start(framework_settings(...), max_steps=..., samples_per_step=...)  # rank 0
    recorder.batch_start()            # the framework's hook before a micro-batch's work
    recorder.flops_begin() / recorder.flops_end(samples)   # around the first micro-batch
    recorder.batch_end()              # after a micro-batch that did not step
    recorder.step(step, loss, grad_norm, ...)              # each optimizer step
    recorder.evaluation(step, {"loss": ...}); recorder.log(step, {"lightning/x": ...})
    recorder.finish(step)

The loss a callback passes is the optimizer step's loss as the framework logs it, over
all of the step's micro-batches, not what reached backward (lightning.py and
transformers.py say how each framework makes it).

FLOPs are counted once, on the first micro-batch of the run, with telemetry.flops'
StepFlopCounter (every attention kernel counted, recomputation kept apart for HFU; the
framework's step cannot be re-run on fake tensors from outside; the count slows that
one micro-batch), divided by its samples and multiplied by the samples of an optimizer
step: so accumulation multiplies the count exactly once.

Data wait is the time between the framework's batch hooks: from the end of one batch's
processing (`batch_end`, or a recorded `step`) to the next batch's start hook. Time in
`paused()` (evaluation, checkpoints) and framework work a callback names with
`not_data()` is not in it. The gaps are disjoint and lie inside the window's wall time,
so `data_wait_pct` stays within 0-100 %.

The gradient norm is computed by the callback before clipping, as a device tensor (one
foreach kernel; no sync), on the steps that close a window only: it is the norm a window
reports (its last step's), and a pass over every gradient each step measured +9 % on a 9
ms Lightning step on CPU (bench/integrations_overhead.py). A non-finite step in between
is still counted through its loss. Per-layer statistics (`inspect`: inspector.py) are the
trainer's Inspector, driven from the framework's hooks. Only the process of global rank 0
records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from redline.device import DeviceInfo
from redline.events import State
from redline.inspector import InspectConfig, Inspector
from redline.run import rundir
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.flops import StepFlopCounter
from redline.telemetry.jsonl import EventLog
from redline.telemetry.metrics import Record
from redline.telemetry.session import Telemetry

# redline's precision name -> the dtype the peak-FLOPs table is keyed by
_COMPUTE_DTYPE = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16",
                  "fp16-mixed": "float16", "fp16-true": "float16"}


def framework_settings(name: str, *, accumulate: int, precision: str, precision_name: str,
                       micro_batch: int, log_every: int, **extra: Any) -> dict[str, Any]:
    """config.yaml's keys for a framework run: `framework` (name, accumulate, the
    framework's own precision string, `extra`) and the redline keys doctor's rules read
    (`precision.name`, `train.batch_size` and `train.effective_batch_size`, samples per
    optimizer step per rank, and `telemetry.log_every`)."""
    return {"framework": {"name": name, "accumulate": accumulate, "precision": precision,
                          **extra},
            "precision": {"name": precision_name},
            "train": {"batch_size": micro_batch,
                      "effective_batch_size": micro_batch * accumulate},
            "telemetry": {"log_every": log_every}}


class RunRecorder:
    """One framework run's redline run directory (module docstring). `inspect`: per-layer
    statistics (off unless its `every` or `snapshot_every` is set)."""

    def __init__(self, run_dir: str | Path | None, config: TelemetryConfig | None,
                 framework: str, device: DeviceInfo | str = "auto",
                 peak_flops: float | None = None, inspect: InspectConfig | None = None
                 ) -> None:
        self.path = Path(run_dir) if run_dir else None
        self.config = config or TelemetryConfig()
        if peak_flops is not None:
            self.config = dataclasses.replace(self.config, peak_flops=peak_flops)
        self.framework = framework
        self.device = device if isinstance(device, DeviceInfo) else DeviceInfo.detect(device)
        self.inspect = inspect or InspectConfig(every=0)
        self.telemetry: Telemetry | None = None
        self.inspector: Inspector | None = None
        self.state = State()
        self._held = contextlib.ExitStack()
        self._flops: Any = None
        self._flops_done = False
        self._gap_from: float | None = None  # a batch's processing ended here
        self._wait = 0.0

    @property
    def run_dir(self) -> Path:
        assert self.path is not None, "start() makes the run directory"
        return self.path

    def start(self, settings: dict[str, Any], *, max_steps: int, samples_per_step: int,
              progress: bool = False, ranks: int = 1, model: torch.nn.Module | None = None,
              start_step: int = 0) -> None:
        """Claim the run directory, write its start files, start telemetry; `settings`:
        config.yaml (framework_settings and the run's own); `ranks`: the framework's
        processes, which share `samples_per_step`; `model`: for `inspect`."""
        self.path, _ = rundir.lock(self.path, self.framework, self._held)
        framework = settings.get("framework")
        settings = {**settings, "framework": {"name": self.framework, **(
            framework if isinstance(framework, dict) else {})}}
        # a framework's objects are written as their str
        rundir.write_config(self.path, json.loads(json.dumps(settings, default=str)))
        rundir.write_environment(self.path, self.device.kind,
                                 {"framework": self.framework, "max_steps": max_steps})
        self.events = self._held.enter_context(EventLog(self.path / "events.jsonl"))
        name = settings.get("precision", {}).get("name", "fp32")
        self.telemetry = Telemetry(self.path, self.config, device=self.device,
                                   samples_per_step=samples_per_step, max_steps=max_steps,
                                   compute_dtype=_COMPUTE_DTYPE.get(name, "float32"),
                                   events=self.events, progress=progress,
                                   run_name=self.path.name, ranks=ranks,
                                   on_window=self._on_window)
        self._held.callback(self.telemetry.close)
        self.state = State(model=model, step=start_step, max_steps=max_steps,
                           run_dir=str(self.path))
        if self.inspect.enabled and model is not None:
            self._start_inspector()
        self.events.event("run_start", step=start_step, max_steps=max_steps,
                          framework=self.framework, device=self.device.name)
        self.telemetry.start(start_step)
        self._gap_from = time.perf_counter()

    def _start_inspector(self) -> None:
        assert self.telemetry is not None
        drawn = {"tensorboard", "wandb"} & set(self.config.trackers)
        self.inspector = Inspector(self.inspect, self.run_dir,
                                   publish=self.telemetry.histograms if drawn else None)
        self.inspector.on_fit_start(self.state)

    def closes_window(self, step: int) -> bool:
        """Whether optimizer step `step` ends a telemetry window (its gradient norm is the
        one reported: the callbacks compute it on those steps only)."""
        assert self.telemetry is not None
        return step % self.config.log_every == 0 or step == self.telemetry.max_steps

    # ---- FLOPs -----------------------------------------------------------------------------

    def flops_begin(self) -> None:
        """Count the FLOPs of the micro-batch about to run, if none was counted yet."""
        if self._flops_done or self._flops is not None:
            return
        self._flops = StepFlopCounter()  # attention counted, recomputation kept apart
        self._flops.__enter__()

    def flops_end(self, samples: int | None) -> None:
        """The counted micro-batch (of `samples`) ended: per sample, times an optimizer
        step's samples (every rank's: MFU divides by all ranks' peak)."""
        if self._flops is None:
            return
        self._flops.__exit__(None, None, None)
        counter, self._flops, self._flops_done = self._flops, None, True
        assert self.telemetry is not None
        scale = self.telemetry.ctx.samples_per_step / samples if samples else 0.0
        model, hardware = counter.model_flops, counter.hardware_flops
        self.telemetry.set_flops(int(model * scale) if model and scale else None,
                                 int(hardware * scale) if hardware and scale else None)

    # ---- data wait -------------------------------------------------------------------------

    def batch_start(self) -> None:
        """The framework is about to process a batch: the gap since the last one ended is
        the loader's wait (module docstring)."""
        if self._gap_from is not None:
            self._wait += time.perf_counter() - self._gap_from
            self._gap_from = None

    def batch_end(self) -> None:
        """A batch's processing ended (one that did not step the optimizer)."""
        self._gap_from = time.perf_counter()

    def not_data(self) -> None:
        """The framework's own work (logging, saving) ran since the last batch ended: it is
        not the loader's wait."""
        if self._gap_from is not None:
            self._gap_from = time.perf_counter()

    # ---- steps -----------------------------------------------------------------------------

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None,
             micro_batch: int | None, lr: float | None, epoch: int, samples: int) -> None:
        """One finished optimizer step; device tensors stay on the device."""
        assert self.telemetry is not None, "start() first"
        self.state.step, self.state.epoch, self.state.samples_seen = step, epoch, samples
        norm = grad_norm if grad_norm is not None else self._no_norm(loss.device)
        self.telemetry.record_step(step, loss.detach(), norm, micro_batch, lr, epoch, samples,
                                   self._wait)
        self._wait = 0.0
        self._gap_from = time.perf_counter()

    @functools.cache  # noqa: B019 (one recorder per run: the cache dies with it)
    def _no_norm(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((), device=device)

    def inspect_step_start(self, completed: int) -> None:
        """The first micro-batch of optimizer step `completed + 1` is about to run."""
        if self.inspector is not None:
            self.state.step = completed
            self.inspector.on_batch_start(self.state, None)

    def inspect_gradients(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The step's gradients are final (before the optimizer steps)."""
        if self.inspector is not None:
            self.inspector.on_before_optimizer_step(self.state, optimizer)  # type: ignore[arg-type]

    def _on_window(self, record: Record) -> None:
        if self.inspector is not None:
            self.inspector.on_window(self.state, record)

    # ---- other rows --------------------------------------------------------------------------

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.telemetry is not None and metrics:
            with self.paused():
                self.telemetry.record_eval(step, metrics)
                self.events.event("eval", step=step, **metrics)

    def log(self, step: int, values: dict[str, float]) -> None:
        """The framework's own logged metrics, as one row (keys already prefixed)."""
        if self.telemetry is not None and values:
            self.telemetry.log(step, values)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block whose time is not step time nor data wait (the framework's validation,
        checkpoints)."""
        with self.telemetry.paused() if self.telemetry else contextlib.nullcontext():
            yield
        self.not_data()

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
        if self.inspector is not None:
            self.state.step = step
            self.inspector.on_fit_end(self.state)
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


def numbers(values: dict[str, Any], prefix: str, skip: frozenset[str] = frozenset(),
            skip_prefixes: tuple[str, ...] = ()) -> dict[str, float]:
    """`values`' numbers (plain or one-element tensors, read once) under `prefix`, less the
    keys in `skip` and those starting with one of `skip_prefixes`."""
    out = {}
    for key, value in values.items():
        if key in skip or key.startswith(skip_prefixes):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
