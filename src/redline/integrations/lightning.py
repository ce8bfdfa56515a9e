"""redline inside PyTorch Lightning: one callback, a redline run directory.

    import lightning as L
    from redline.integrations.lightning import RedlineCallback

    trainer = L.Trainer(max_steps=1000, callbacks=[RedlineCallback("runs/my-run")])
    trainer.fit(model, datamodule)
    # then: redline doctor runs/my-run ; redline report runs/my-run

The callback records what `redline train` records (integrations/recorder.py): windows of
`log_every` optimizer steps with no host sync on the steps between (Lightning's own
ThroughputMonitor synchronises every batch), the writer process with the hardware sampler,
MFU against the device's peak, data wait, memory, `redline/overhead_pct`, and validation
metrics (`val*` keys of callback_metrics) as eval rows. Under `accumulate_grad_batches`:

  - the loss is the optimizer step's: the mean of its micro-batches' `training_step`
    losses, undivided (Lightning divides the returned loss by accumulate_grad_batches
    before backward; `self.log(..., on_step=True)` shows each micro-batch's undivided one);
  - FLOPs are counted on the first micro-batch, per sample, times a step's samples;
  - data wait is the time from one micro-batch's on_train_batch_end to the next one's
    on_train_batch_start (validation excluded);
  - the gradient norm is taken in on_before_optimizer_step: after AMP's unscale, before
    Lightning's gradient clipping.

What Lightning logs (`trainer.logged_metrics`: `self.log` values, validation's excepted)
is recorded as `lightning/<name>` rows on the steps that close a window. config.yaml holds
`framework` (name, accumulate, Lightning's precision flag, ...) and the redline keys
doctor reads (`precision.name`, `train.batch_size`, `train.effective_batch_size`).
`inspect_every` adds per-layer statistics (inspector.py). Only global rank 0 writes.

And a batch-size search, which Lightning's own Tuner refuses under DDP:

    plan = find_batch_size(model, datamodule, effective_batch_size=256,
                           precision="bf16-mixed")
    datamodule.batch_size = plan.micro_batch
    trainer = L.Trainer(accumulate_grad_batches=plan.accumulate_grad_batches, ...)

It runs redline's autobatch (autobatch.py: probes, a fitted memory line, a verified size, the
throughput knee) on the module's own `training_step` and `configure_optimizers` and the
datamodule's training set, and keeps the effective batch by accumulation. Under torchrun
every rank searches its own device and they settle on the smallest size (one message),
and the effective batch is shared by the ranks.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redline.batch import Collated, leading_size
from redline.errors import MissingExtra
from redline.inspector import InspectConfig
from redline.integrations.recorder import (
    RunRecorder,
    framework_settings,
    grad_norm,
    numbers,
    telemetry_config,
)
from redline.telemetry.config import TelemetryConfig

try:
    from lightning.pytorch.callbacks import Callback as _Base
except ImportError:  # the class must exist to be named in the error below
    try:
        from pytorch_lightning.callbacks import Callback as _Base  # type: ignore[no-redef]
    except ImportError:
        _Base = None  # type: ignore[assignment,misc]


def _require() -> None:
    if _Base is None:
        raise MissingExtra("redline's Lightning callback", "lightning", "lightning")


class RedlineCallback(_Base if _Base is not None else object):  # type: ignore[misc]
    """Record a Lightning run into a redline run directory (module docstring).

    `run_dir`: where (default runs/lightning-TIME); `config`: the telemetry section
    (trackers, log_every, ...), or `log_every` / `trackers` alone; `peak_flops`: FLOP/s for
    MFU where the device table has none; `inspect_every`: per-layer statistics every so
    many optimizer steps (0, the default: off; `inspect`: the whole section).
    """

    def __init__(self, run_dir: str | Path | None = None, config: TelemetryConfig | None = None,
                 *, log_every: int | None = None, trackers: tuple[str, ...] | None = None,
                 peak_flops: float | None = None, inspect_every: int = 0,
                 inspect: InspectConfig | None = None) -> None:
        _require()
        super().__init__()
        self.config = telemetry_config(config, log_every, trackers)
        self.inspect = inspect or InspectConfig(every=inspect_every)
        self.run_dir, self.peak_flops = run_dir, peak_flops
        self.recorder: RunRecorder | None = None
        self._norm: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None  # the open step's micro-batch losses, summed
        self._micro = 0  # micro-batches in the open step
        self._samples: int | None = None
        self._last_step = -1
        self._undo = 1  # what Lightning divided the returned loss by

    # ---- Lightning's hooks -------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        device = "cuda" if pl_module.device.type == "cuda" else "cpu"
        self.recorder = RunRecorder(self.run_dir, self.config, "lightning", device,
                                    self.peak_flops, self.inspect)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        # automatic optimization divides the loss by accumulate_grad_batches before backward
        self._undo = accumulate if pl_module.automatic_optimization else 1
        micro, ranks = self._batch_size(trainer), max(1, trainer.world_size)
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else (
            (trainer.max_epochs or 1) * max(1, trainer.num_training_batches) // accumulate)
        flag = str(trainer.precision)
        settings = framework_settings(
            "lightning", accumulate=accumulate, precision=flag,
            precision_name=_precision_name(flag), micro_batch=micro,
            log_every=self.config.log_every, world_size=trainer.world_size,
            max_steps=max_steps, gradient_clip_val=trainer.gradient_clip_val,
            num_workers=getattr(trainer.train_dataloader, "num_workers", None))
        settings.update(model=type(pl_module).__name__,
                        hparams=dict(getattr(pl_module, "hparams", {}) or {}))
        self.recorder.start(settings, max_steps=max_steps,
                            samples_per_step=micro * accumulate * ranks, ranks=ranks,
                            model=pl_module, start_step=trainer.global_step)
        self._last_step = trainer.global_step  # records start at the next optimizer step
        self._loss, self._micro = None, 0  # a callback fitted again starts afresh

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if self.recorder is None:
            return
        self.recorder.batch_start()
        if self._micro == 0:
            self.recorder.inspect_step_start(trainer.global_step)
        self._samples = leading_size(batch)
        self.recorder.flops_begin()  # the run's first micro-batch only

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Lightning calls this before it clips, after AMP unscaled: the pre-clip norm
        if self.recorder is not None:
            self._norm = (grad_norm(pl_module.parameters())
                          if self.recorder.closes_window(trainer.global_step + 1) else None)
            self.recorder.inspect_gradients(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        recorder.flops_end(self._samples)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # summed on the device: no host read
            loss = loss.detach().float() * self._undo
            self._loss = loss if self._loss is None else self._loss + loss
            self._micro += 1
        step = trainer.global_step
        if step <= self._last_step:
            recorder.batch_end()  # an accumulation micro-batch: the optimizer has not stepped
            return
        self._last_step = step
        if self._loss is None:  # training_step returned no loss: nothing to record
            recorder.batch_end()
            self._micro = 0
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        per_step = recorder.telemetry.ctx.samples_per_step  # type: ignore[union-attr]
        recorder.step(step, self._loss / self._micro, self._norm, self._batch_size(trainer),
                      lr, trainer.current_epoch, step * per_step)
        self._loss, self._micro = None, 0
        if recorder.closes_window(step):  # Lightning's own values (self.log), read once
            recorder.log(step, numbers(trainer.logged_metrics, "lightning/",
                                       frozenset({"epoch", "step"}), ("val_", "val/")))

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self._validating = self.recorder.paused()
            self._validating.__enter__()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is None:
            return
        self._validating.__exit__(None, None, None)
        metrics = {k.removeprefix("val_").removeprefix("val/"): float(v)
                   for k, v in trainer.callback_metrics.items()
                   if k.startswith("val") and isinstance(v, (torch.Tensor, float, int))}
        if not trainer.sanity_checking:
            self.recorder.evaluation(trainer.global_step, metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self.recorder.finish(trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.events.event("failed", step=trainer.global_step,
                                       error=type(exception).__name__)
            self.recorder.finish(trainer.global_step)

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _batch_size(trainer: Any) -> int:
        loader = getattr(trainer, "train_dataloader", None)
        size = getattr(loader, "batch_size", None) if loader is not None else None
        return int(size or 1)


@dataclass(frozen=True)
class BatchPlan:
    """What `find_batch_size` chose: give the loader `micro_batch` and the Trainer
    `accumulate_grad_batches`; micro_batch x accumulate_grad_batches x ranks is
    `effective_batch_size` exactly (Lightning accumulates whole loader batches, so the
    micro-batch is the largest divisor of each rank's share within the size searched)."""

    micro_batch: int
    accumulate_grad_batches: int
    effective_batch_size: int
    max_fit: int  # the largest micro-batch within the memory target
    ranks: int = 1


def find_batch_size(module: Any, datamodule: Any = None, *, effective_batch_size: int,
                    precision: str = "fp32", memory_budget: str | int | None = None,
                    target: float = 0.85, device: str = "auto") -> BatchPlan:
    """The fastest micro-batch within `target` of the memory (module docstring).

    `precision`: a redline name or Lightning's flag ("bf16-mixed", "16-mixed", "32-true");
    `memory_budget`: e.g. "8GiB" (default: the device's memory; on a CPU a share of the
    memory available now); `device`: auto, cpu, cuda or cuda:N."""
    _require()
    from redline import distributed
    from redline.config import RunConfig
    from redline.job.build import rank_device
    from redline.tuning.autobatch import autobatch_ranks

    world = distributed.World.from_env()
    config = RunConfig(device=device).updated({
        "precision.name": _precision_name(precision), "memory.target": target,
        "memory.budget": memory_budget, "train.batch_size": "auto",
        "train.effective_batch_size": effective_batch_size})
    spec = rank_device(device, world)
    comm = distributed.init(world, spec.kind)
    with warnings.catch_warnings():  # self.log() outside a Trainer warns on every call
        warnings.simplefilter("ignore")
        result = autobatch_ranks(_ModuleTask(module, datamodule), config, spec, comm)
    share = effective_batch_size // world.size
    # Lightning accumulates whole loader batches: the micro-batch must divide the share
    steps = next(a for a in range(math.ceil(share / result.chosen), share + 1)
                 if share % a == 0)
    return BatchPlan(share // steps, steps, effective_batch_size, result.max_fit, world.size)


class _ModuleTask:
    """A LightningModule and its data as a redline Task (task.py), for the batch search."""

    def __init__(self, module: Any, datamodule: Any) -> None:
        self.module, self.name = module, type(module).__name__
        source = datamodule if datamodule is not None else module
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
        self._train = _dataset(source.train_dataloader())
        try:
            self._eval = _dataset(source.val_dataloader())
        except Exception:  # no validation loader (Lightning raises when it is not defined)
            self._eval = None

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.module)

    def train_data(self) -> Any:
        return self._train

    def eval_data(self) -> Any:
        return self._eval

    def loss(self, model: Any, batch: Any) -> torch.Tensor:
        step = model.training_step if model.training else model.validation_step
        out = step(batch, 0)
        if out is None:  # a validation_step that only logs: measured by a forward instead
            return torch.zeros(())
        return out["loss"] if isinstance(out, dict) else out

    def optimizer(self, model: Any) -> torch.optim.Optimizer | None:
        chosen: Any = model.configure_optimizers()
        if isinstance(chosen, dict):
            chosen = chosen.get("optimizer")
        if isinstance(chosen, list | tuple):
            chosen = chosen[0] if chosen else None
            if isinstance(chosen, list | tuple):
                chosen = chosen[0] if chosen else None
        return chosen if isinstance(chosen, torch.optim.Optimizer) else None


def _dataset(loader: Any) -> Any:
    if isinstance(loader, list | tuple):  # several loaders: the first is searched on
        loader = loader[0]
    collate = getattr(loader, "collate_fn", None)
    # the loader's batching goes with its dataset (batch.collate_of reads it)
    return loader.dataset if collate is None else Collated(loader.dataset, collate)


def _precision_name(flag: str) -> str:
    """Lightning's precision flag -> redline's precision name (a redline name passes)."""
    names = {"32": "fp32", "32-true": "fp32", "16": "fp16-mixed", "16-mixed": "fp16-mixed",
             "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true",
             "16-true": "fp16-true", "64": "fp64", "64-true": "fp64",
             "transformer-engine": "fp8", "transformer-engine-float16": "fp8"}
    return names.get(str(flag), str(flag))


