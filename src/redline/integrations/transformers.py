"""redline inside the Hugging Face Trainer: one TrainerCallback, a redline run directory.

    from transformers import Trainer, TrainingArguments
    from redline.integrations.transformers import RedlineCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000),
                      train_dataset=train, eval_dataset=val,
                      callbacks=[RedlineCallback("runs/my-run")])
    trainer.train()
    # then: redline doctor runs/my-run ; redline report runs/my-run

The callback records what `redline train` records (integrations/recorder.py). The Trainer
hands callbacks no loss tensor, so a forward hook on the model keeps the training forward's
`loss` (a device tensor, averaged over a step's micro-batches on the device); the gradient
norm is taken before the optimizer steps (after the Trainer's own clipping, when
max_grad_norm is set); `on_evaluate`'s metrics become eval rows. Only the process of
global rank 0 (`state.is_world_process_zero`) writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from redline.errors import MissingExtra
from redline.integrations.recorder import RunRecorder, grad_norm, telemetry_config
from redline.telemetry.config import TelemetryConfig

try:
    from transformers import TrainerCallback as _Base
except ImportError:
    _Base = None  # type: ignore[assignment,misc]


class RedlineCallback(_Base if _Base is not None else object):  # type: ignore[misc]
    """Record a transformers.Trainer run into a redline run directory (module docstring).

    `run_dir`: where (default runs/transformers-TIME); `config`: the telemetry section, or
    `log_every` / `trackers` alone; `peak_flops`: FLOP/s for MFU where the table has none.
    """

    def __init__(self, run_dir: str | Path | None = None, config: TelemetryConfig | None = None,
                 *, log_every: int | None = None, trackers: tuple[str, ...] | None = None,
                 peak_flops: float | None = None) -> None:
        if _Base is None:
            raise MissingExtra("redline's Hugging Face callback", "transformers",
                               "transformers")
        self.config = telemetry_config(config, log_every, trackers)
        self.run_dir, self.peak_flops = run_dir, peak_flops
        self.recorder: RunRecorder | None = None
        self._loss: torch.Tensor | None = None
        self._micro = 0
        self._norm: torch.Tensor | None = None
        self._wait = 0.0
        self._hook: Any = None
        self._evaluating: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.recorder = RunRecorder(self.run_dir, self.config, "transformers", device,
                                    self.peak_flops)
        self._batch = int(args.per_device_train_batch_size)
        self._accumulate = int(args.gradient_accumulation_steps)
        per_step = self._batch * self._accumulate * max(1, int(args.world_size))
        dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
        self.recorder.start({"model": type(model).__name__,
                             "model_config": _plain(getattr(model, "config", None)),
                             "training_args": {k: v for k, v in args.to_dict().items()
                                               if isinstance(v, (int, float, str, bool))}},
                            max_steps=int(state.max_steps), samples_per_step=per_step,
                            compute_dtype=dtype, ranks=max(1, int(args.world_size)))
        self._hook = model.register_forward_hook(self._keep_loss)
        self.recorder.count_flops_of_next_step()

    def _keep_loss(self, module: Any, args: Any, output: Any) -> None:
        if not module.training:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor):  # summed on the device: no host read
            loss = loss.detach().float()
            self._loss = loss if self._loss is None else self._loss + loss
            self._micro += 1

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self._wait += self.recorder.batch_start()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kwargs: Any) -> None:
        if self.recorder is not None and model is not None:
            self._norm = (grad_norm(model.parameters())
                          if self.recorder.closes_window(int(state.global_step) + 1) else None)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.recorder is None or self._loss is None:
            return
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        step = int(state.global_step)
        per_step = self.recorder.telemetry.ctx.samples_per_step  # type: ignore[union-attr]
        self.recorder.step(step, self._loss / max(1, self._micro), self._norm, self._batch, lr,
                           int(state.epoch or 0), step * per_step, self._wait,
                           self._accumulate)
        self._loss, self._micro, self._wait = None, 0, 0.0

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
        if not metrics:
            return
        values = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not k.endswith(("_runtime", "per_second"))}
        self.recorder.evaluation(int(state.global_step), values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            if self._hook is not None:
                self._hook.remove()
            self.recorder.finish(int(state.global_step))
            self.recorder = None


def _plain(config: Any) -> dict[str, Any]:
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
