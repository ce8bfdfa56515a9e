"""redline inside the Hugging Face Trainer: one TrainerCallback, a redline run directory.

    from transformers import Trainer, TrainingArguments
    from redline.integrations.transformers import RedlineCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000),
                      train_dataset=train, eval_dataset=val,
                      callbacks=[RedlineCallback("runs/my-run")])
    trainer.train()
    # then: redline doctor runs/my-run ; redline report runs/my-run

The callback records what `redline train` records (integrations/recorder.py). The Trainer
hands callbacks no loss tensor, so a forward hook on the model keeps each training
forward's `loss` (a device tensor) and makes the optimizer step's loss the way the Trainer
does before it logs `loss`: where the model was given `num_items_in_batch`, each
micro-batch's loss is already its share of the step's and they are summed; otherwise
they are averaged. Under `gradient_accumulation_steps`:

  - FLOPs are counted on the first micro-batch, per sample, times a step's samples;
  - data wait is the time from the end of one optimizer step (on_step_end, or the
    logging, evaluation and saving hooks that follow it) to the next on_step_begin: the
    Trainer fetches all of a step's micro-batches before that hook;
  - the gradient norm is the pre-clip norm the Trainer logs as `grad_norm`: taken at the
    end of the backward pass (a callback queued from the loss's gradient hook, after any
    queued by DDP), before the Trainer clips, divided by fp16's loss scale.

The Trainer's own logs (`on_log`: loss, grad_norm, learning_rate, ...) are recorded as
`hf/<name>` rows (not `epoch`, a position rather than a metric; evaluation's come from
`on_evaluate` as eval rows). config.yaml holds `framework` (name, accumulate, the
Trainer's precision, ...) and the redline keys doctor reads (`precision.name`,
`train.batch_size`, `train.effective_batch_size`). `inspect_every` adds per-layer
statistics (inspector.py; gradients as the optimizer receives them, after clipping, as in
redline's trainer). Only the process of global rank 0 (`state.is_world_process_zero`)
writes. A model that returns no loss (a `compute_loss_func`, label smoothing) records no
steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from redline.batch import leading_size
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
    from transformers import TrainerCallback as _Base
except ImportError:
    _Base = None  # type: ignore[assignment,misc]


class RedlineCallback(_Base if _Base is not None else object):  # type: ignore[misc]
    """Record a transformers.Trainer run into a redline run directory (module docstring).

    `run_dir`: where (default runs/transformers-TIME); `config`: the telemetry section, or
    `log_every` / `trackers` alone; `peak_flops`: FLOP/s for MFU where the table has none;
    `inspect_every`: per-layer statistics every so many optimizer steps (0, the default:
    off; `inspect`: the whole section).
    """

    def __init__(self, run_dir: str | Path | None = None, config: TelemetryConfig | None = None,
                 *, log_every: int | None = None, trackers: tuple[str, ...] | None = None,
                 peak_flops: float | None = None, inspect_every: int = 0,
                 inspect: InspectConfig | None = None) -> None:
        if _Base is None:
            raise MissingExtra("redline's Hugging Face callback", "transformers",
                               "transformers")
        self.config = telemetry_config(config, log_every, trackers)
        self.inspect = inspect or InspectConfig(every=inspect_every)
        self.run_dir, self.peak_flops = run_dir, peak_flops
        self.recorder: RunRecorder | None = None
        self._loss: torch.Tensor | None = None  # the open step's micro-batch losses, summed
        self._micro = 0
        self._shared = False  # the losses are shares of the step's (num_items_in_batch)
        self._samples: int | None = None  # the open step's first micro-batch's samples
        self._want_norm = False
        self._norm: torch.Tensor | None = None
        self._hook: Any = None
        self._evaluating: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.recorder = RunRecorder(self.run_dir, self.config, "transformers", device,
                                    self.peak_flops, self.inspect)
        self._batch = int(args.per_device_train_batch_size)
        self._accumulate = int(args.gradient_accumulation_steps)
        ranks = max(1, int(args.world_size))
        # the Trainer multiplies a num_items_in_batch loss by the ranks after the forward
        self._rank_scale = ranks if getattr(args, "average_tokens_across_devices", False) else 1
        self._model = model
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's, under fp16
        flag, name = _precision(args, model)
        settings = framework_settings(
            "transformers", accumulate=self._accumulate, precision=flag,
            precision_name=name, micro_batch=self._batch, log_every=self.config.log_every,
            world_size=ranks, max_steps=int(state.max_steps),
            max_grad_norm=args.max_grad_norm, num_workers=args.dataloader_num_workers)
        settings.update(model=type(model).__name__,
                        model_config=_plain(getattr(model, "config", None)),
                        training_args={k: v for k, v in args.to_dict().items()
                                       if isinstance(v, (int, float, str, bool))})
        self.recorder.start(settings, max_steps=int(state.max_steps),
                            samples_per_step=self._batch * self._accumulate * ranks,
                            ranks=ranks, model=model, start_step=int(state.global_step))
        self._loss, self._micro, self._norm = None, 0, None  # a callback trained again
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def _keep_loss(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not module.training or self.recorder is None:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if not isinstance(loss, torch.Tensor):
            return
        if self._samples is None:
            self._samples = leading_size((args, kwargs))
        self._shared = kwargs.get("num_items_in_batch") is not None
        part = loss.detach().float() * (self._rank_scale if self._shared else 1)
        self._loss = part if self._loss is None else self._loss + part  # on the device
        self._micro += 1
        if self._want_norm and loss.requires_grad:
            loss.register_hook(self._after_backward)

    def _after_backward(self, grad: torch.Tensor) -> None:
        engine = torch.autograd.Variable._execution_engine
        # a callback queued by a queued callback runs after every callback queued during
        # the backward, DDP's gradient all-reduce among them: the gradients are final
        engine.queue_callback(lambda: engine.queue_callback(self._take_norm))

    def _take_norm(self) -> None:
        norm = grad_norm(self._model.parameters())
        scaler = self._scaler
        if norm is not None and scaler is not None and scaler.is_enabled():
            # not yet unscaled: the Trainer unscales when it clips
            scale = getattr(scaler, "_scale", None)
            norm = norm / (scale.reshape(()) if isinstance(scale, torch.Tensor)
                           else scaler.get_scale())
        self._norm = norm

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None:
            return
        self.recorder.batch_start()  # the Trainer has fetched the step's micro-batches
        step = int(state.global_step)
        self.recorder.inspect_step_start(step)
        self._want_norm = self.recorder.closes_window(step + 1)
        self._samples = None
        self.recorder.flops_begin()  # the run's first micro-batch only

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.flops_end(self._samples or self._batch)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.flops_end(self._samples or self._batch)  # accumulation 1
            self.recorder.inspect_gradients(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.recorder is None or self._loss is None:
            return
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        step = int(state.global_step)
        loss = self._loss if self._shared else self._loss / max(1, self._micro)
        per_step = self.recorder.telemetry.ctx.samples_per_step  # type: ignore[union-attr]
        self.recorder.step(step, loss, self._norm if self._want_norm else None, self._batch,
                           lr, int(state.epoch or 0), step * per_step)
        self._loss, self._micro, self._norm = None, 0, None

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        if self.recorder is None:
            return
        self.recorder.log(int(state.global_step),
                          numbers(logs or {}, "hf/", frozenset({"epoch"}), ("eval_",)))
        self.recorder.not_data()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.not_data()

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None and self._evaluating is None:  # evaluation is not step time
            self._evaluating = self.recorder.paused()
            self._evaluating.__enter__()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:
        if self.recorder is None:
            return
        if self._evaluating is not None:
            self._evaluating.__exit__(None, None, None)
            self._evaluating = None
        self.recorder.not_data()
        if not metrics:
            return
        values = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and k != "epoch"
                  and not k.endswith(("_runtime", "per_second"))}
        self.recorder.evaluation(int(state.global_step), values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            if self._hook is not None:
                self._hook.remove()
            self.recorder.finish(int(state.global_step))
            self.recorder = None


def _precision(args: Any, model: Any) -> tuple[str, str]:
    """The Trainer's precision (its flag, or the weights' dtype without one) and redline's
    name for it."""
    if args.bf16:
        return "bf16", "bf16-mixed"
    if args.fp16:
        return "fp16", "fp16-mixed"
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return "bfloat16", "bf16-true"
    if dtype == torch.float16:
        return "float16", "fp16-true"
    return ("tf32", "tf32") if getattr(args, "tf32", None) else ("fp32", "fp32")


def _plain(config: Any) -> dict[str, Any]:
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
