"""The training loop: steps and epochs, evaluation, checkpoints, signals, exact resume.

Exact resume rests on four things being restored together: the parameters and optimizer
state, the RNG states (python, numpy, torch, cuda), the loss scaler, and the position in
the data (epoch and batches consumed; see data.py). With those, a run that is killed and
resumed on the CPU with a fixed seed ends with the same bits as one that was never
stopped. Evaluation runs under a forked, re-seeded RNG so it neither perturbs training
nor varies between evaluations.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from redline import checkpoint as ckpt
from redline.config import ConfigError, RunConfig
from redline.data import LimitedLoader, eval_loader, iterate_from, loader_options, train_loader
from redline.device import DeviceInfo
from redline.doctor import environment_check
from redline.engine import Engine, build_optimizer, move_to
from redline.evaluation import evaluate
from redline.events import Callback, Dispatcher, Event, State
from redline.lifecycle import Signals, default_run_dir, lr_lambda
from redline.memory.autobatch import autobatch
from redline.memory.guard import OOMGuard
from redline.memory.probe import MemoryBudget, live_tensor_bytes
from redline.precision import get_precision
from redline.task import Task, resolve_task
from redline.telemetry.console import status
from redline.telemetry.jsonl import EventLog
from redline.telemetry.session import TelemetrySession


@dataclass
class FitResult:
    run_dir: str
    steps: int
    samples: int
    final_loss: float | None
    precision: str
    device: str
    eval: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    interrupted: str | None = None  # the signal's name when stopped by SIGTERM/SIGINT
    checkpoint: str | None = None
    samples_per_s: float | None = None  # the last window's
    mfu: float | None = None  # the last window's; None where the peak is unknown
    overhead_pct: float | None = None  # redline's own time on the training thread, last window

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Trains `config.task` (or a Task object) and writes a run directory.

        result = Trainer(load_config("run.yaml"), run_dir="runs/exp1").fit()
    """

    def __init__(self, config: RunConfig, task: Task | None = None,
                 run_dir: str | Path | None = None, resume: bool = False,
                 callbacks: Iterable[Callback] = (), progress: bool | None = None) -> None:
        if task is None:
            if not config.task:
                raise ConfigError("no task given: name one (e.g. redline train sr3-tiny) "
                                  "or set 'task' in the config file")
            task = resolve_task(config.task, config.task_args)
        self.config = config
        self.task = task
        self.device = DeviceInfo.detect(config.device)
        self.precision = get_precision(config.precision.name, self.device)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(task.name)
        self.resume = resume
        self.user_callbacks = list(callbacks)
        self.budget: MemoryBudget | None = None  # the active memory.budget, during fit
        self.progress = progress

    # ---- set-up -------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.config.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build(self) -> None:
        cfg = self.config.train
        self._seed()
        model = self.task.build_model().to(self.device.torch_device)
        self.model = self.precision.convert_module(model)
        self.step_model: nn.Module = (torch.compile(self.model) if self.config.precision.compile
                                      else self.model)
        try:
            self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        except ValueError as e:
            raise ConfigError(f"task {self.task.name!r}: {e}") from None
        self.train_set = self.task.train_data()
        self.eval_set = self.task.eval_data()
        self.loader_opts = loader_options(self.config.data, self.device.kind)
        self.loader = train_loader(self.train_set, cfg.samples_per_step, cfg.seed,
                                   self.loader_opts)
        self.steps_per_epoch = len(self.train_set) // cfg.samples_per_step  # type: ignore[arg-type]
        self.max_steps = cfg.steps if cfg.epochs is None else min(
            cfg.steps, cfg.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, self.max_steps))
        self.state = State(model=self.model, optimizer=self.optimizer,
                           max_steps=self.max_steps, run_dir=str(self.run_dir))

    def _telemetry(self, tracker_run_id: str | None) -> TelemetrySession:
        tracker = lambda: getattr(self.budget, "tracker", None)  # noqa: E731
        return TelemetrySession(
            self.config.telemetry, self.run_dir, self.device,
            self.precision.compute_dtype_name, None, self.events, max_steps=self.max_steps,
            samples_per_step=self.config.train.samples_per_step,
            memory_total=self.config.memory.budget_bytes or self.device.memory_total,
            tracker=tracker, progress=self.progress, tracker_run_id=tracker_run_id,
            run_name=self.run_dir.name)

    # ---- resume ---------------------------------------------------------------------------

    def _checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "engine": self.engine.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "samples_seen": self.state.samples_seen,
            "config": self.config.to_dict(),
            "task": self.task.name,
            "tracker_run_id": self.telemetry.tracker_run_id,
        }

    def _load_checkpoint(self, skipped: list[str]) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint; unreadable ones are reported and skipped."""
        def skip(path: Path, reason: str) -> None:
            print(f"warning: {reason}; trying the previous checkpoint", flush=True,
                  file=sys.stderr)
            self.events.event("checkpoint_skipped", path=str(path), reason=reason)
            skipped.append(str(path))

        found = ckpt.load_latest(self.run_dir / "checkpoints", self.device.torch_device,
                                 on_skip=skip)
        if found is None:
            self.events.event("resume_fresh", reason="no checkpoint in run directory")
            return None
        ckpt.check_resumable(found[1].get("config", {}), self.config.to_dict(), found[0])
        return found

    def _apply_checkpoint(self, path: Path, payload: dict[str, Any]) -> int:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.engine.load_state_dict(payload["engine"])
        ckpt.set_rng_state(payload["rng"])
        self.state.step = int(payload["step"])
        self.state.epoch = int(payload["epoch"])
        self.state.batch_in_epoch = int(payload["batch_in_epoch"])
        self.state.samples_seen = int(payload["samples_seen"])
        self.events.event("resumed", path=str(path), step=self.state.step)
        return self.state.step

    def save_checkpoint(self) -> Path:
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.state.step,
                                    self._checkpoint_payload(), self.config.checkpoint.keep)
        self.state.extra["checkpoint_time_s"] = time.perf_counter() - t0
        self.events.event("checkpoint_saved", step=self.state.step, path=str(path))
        self.dispatcher.fire(Event.CHECKPOINT_SAVED, self.state, str(path))
        return path

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> FitResult:
        if not self.resume and ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            raise ConfigError(f"run directory {str(self.run_dir)!r} already has checkpoints; "
                              "pass --resume to continue it, or choose another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tuned = self._resolve_auto_batch() if self.config.train.auto_batch else None
        self._build()
        self.events = EventLog(self.run_dir / "events.jsonl")
        skipped: list[str] = []
        found = self._load_checkpoint(skipped) if self.resume else None
        self.telemetry = self._telemetry(found[1].get("tracker_run_id") if found else None)
        try:  # the writer process is running from here: a failure must stop it
            self.dispatcher = Dispatcher([*self.telemetry.callbacks, _MemoryEvents(self.events),
                                          *self.user_callbacks])
            mem, micro = self.config.memory, self.config.train.micro_batch
            guard = OOMGuard(micro, mem.grow_after) if mem.oom_guard else False
            self.engine = Engine(self.step_model, self.optimizer, self.precision,
                                 scheduler=self.scheduler, grad_clip=self.config.train.grad_clip,
                                 micro_batch_size=micro, dispatcher=self.dispatcher,
                                 state=self.state, oom_guard=guard)
            self.telemetry.metrics.engine = self.engine
            for path in skipped:
                self.dispatcher.fire(Event.ANOMALY, self.state,
                                     {"kind": "corrupt_checkpoint", "path": path})
            if tuned is not None:
                self.events.event("autobatch", **tuned)
            self._write_run_files()
            resumed = self._apply_checkpoint(*found) if found else None
        except BaseException:
            self.telemetry.close()
            raise
        self.events.event("run_start", step=self.state.step, max_steps=self.max_steps,
                          precision=self.precision.name, device=self.device.name)
        result = FitResult(run_dir=str(self.run_dir), steps=self.state.step, samples=0,
                           final_loss=None, precision=self.precision.name,
                           device=self.device.name, resumed_from=resumed)
        last_saved: Path | None = None
        try:
            self.telemetry.count_flops(self.step_model, self.train_set, micro, self.task.loss,
                                       getattr(self.task, "flops_per_sample", None))
            with self.precision.global_context(), Signals() as signals, \
                    self._budget() as self.budget:
                self.dispatcher.fire(Event.FIT_START, self.state)
                self._loop(signals)
                if self.state.step > 0:
                    last_saved = self.save_checkpoint()
                if signals.received:
                    result.interrupted = signals.received
                    self.events.event("interrupted", signal=signals.received,
                                      step=self.state.step)
                elif self.eval_set is not None:
                    result.eval = self.evaluate()
                self.dispatcher.fire(Event.FIT_END, self.state)
        except BaseException as exc:
            self._save_after_failure(exc)
            raise
        finally:
            self.telemetry.close()  # flushes the sinks, stops the sampler and progress bar
            self.events.close()
        result.steps, result.samples = self.state.step, self.state.samples_seen
        last = self.telemetry.metrics.last
        result.final_loss = last.get("loss")
        result.samples_per_s, result.mfu = last.get("samples_per_s"), last.get("mfu")
        result.overhead_pct = last.get("redline/overhead_pct")
        result.checkpoint = str(last_saved) if last_saved else None
        return result

    def _save_after_failure(self, exc: BaseException) -> None:
        """Keep the work of every completed step when the loop dies of an exception.

        The state is that of the last completed step, unless the failure struck while the
        optimizer was updating the parameters; the RNG has moved on by part of a step, so
        resuming from this checkpoint is not bit-exact.
        """
        step = self.state.step
        saved = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        if step == 0 or self.engine.updating or (saved and saved[-1].name ==
                                                 ckpt.checkpoint_name(step)):
            self.events.event("failed", step=step, error=type(exc).__name__)
            return
        try:
            path = self.save_checkpoint()
        except Exception as save_error:  # the disk may be why we failed
            print(f"redline: could not save a checkpoint after the failure: {save_error}",
                  file=sys.stderr)
            return
        self.events.event("failed", step=step, error=type(exc).__name__,
                          checkpoint=str(path), exact_resume=False)
        print(f"redline: {type(exc).__name__} after step {step}; saved {path}; continue with "
              "--resume once fixed", file=sys.stderr)

    def _resolve_auto_batch(self) -> dict[str, Any]:
        """batch_size: auto -> the tuned micro-batch, effective batch, lr and eval batch.

        A resumed run reuses the values its first start chose (they are in config.yaml),
        so the math of the steps already taken does not change.
        """
        t = self.config.train
        saved = self.run_dir / "config.yaml"
        if self.resume and saved.is_file() and ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            old = yaml.safe_load(saved.read_text())["train"]
            t.batch_size, t.effective_batch_size = old["batch_size"], old["effective_batch_size"]
            t.lr, t.eval_batch_size = old["lr"], old["eval_batch_size"]
            return {"source": str(saved), "micro_batch": t.batch_size}
        with status("autobatch", interactive=self.progress) as say:
            r = autobatch(self.task, self.config, self.device, progress=say)
        r.apply(t)
        return {"micro_batch": r.chosen, "max_fit": r.max_fit,
                "accumulation_steps": r.accumulation_steps,
                "effective_batch_size": r.effective_batch_size, "lr": r.lr,
                "eval_batch_size": r.eval_batch_size, "cache_hit": r.cache_hit,
                "probe_steps": r.probe_steps, "verify_steps": r.verify_steps}

    def _budget(self) -> contextlib.AbstractContextManager[Any]:
        """memory.budget enforced around the loop (on CPU: every op tracked, slower)."""
        budget = self.config.memory.budget_bytes
        if budget is None:
            return contextlib.nullcontext()
        return MemoryBudget(budget, self.device,
                            baseline=live_tensor_bytes(self.model, self.optimizer))

    def _loop(self, signals: Signals) -> None:
        cfg = self.config
        device = self.device.torch_device
        non_blocking = bool(self.loader_opts.get("pin_memory"))
        # A loader's batches are on the CPU already: Tensor.to would only cost ~5 us a step.
        move = device.type != "cpu"
        loss_fn = self.task.loss
        metrics = self.telemetry.metrics
        # The handlers, looked up once: an event nobody listens to costs nothing per step.
        on_batch_start = self.dispatcher.table[Event.BATCH_START]
        on_step_end = self.dispatcher.table[Event.STEP_END]
        state = self.state
        while self.state.step < self.max_steps and not signals.received:
            if self.state.batch_in_epoch == 0:
                self.dispatcher.fire(Event.EPOCH_START, self.state)
            batches = iterate_from(self.loader, self.state.epoch, self.state.batch_in_epoch)
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                metrics.data_wait_s += time.perf_counter() - t  # the host waited on the loader
                if batch is None:
                    break
                if move:
                    batch = move_to(batch, device, non_blocking)
                for handler in on_batch_start:
                    handler(state, batch)
                loss = self.engine.step(batch, loss_fn)
                state.step += 1
                state.batch_in_epoch += 1
                state.samples_seen += cfg.train.samples_per_step
                for handler in on_step_end:
                    handler(state, loss)
                step = state.step
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                        and step < self.max_steps:
                    self.evaluate()
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 \
                        and step < self.max_steps:
                    self.save_checkpoint()
                if signals.received or step >= self.max_steps:
                    break
            # An epoch whose last batch is also the run's last step ends too.
            if self.state.batch_in_epoch >= self.steps_per_epoch:
                self.dispatcher.fire(Event.EPOCH_END, self.state)
                self.state.epoch += 1
                self.state.batch_in_epoch = 0

    # ---- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluation loss and the task's metrics on the evaluation set."""
        if self.eval_set is None:
            return {}
        t0 = time.perf_counter()
        cfg = self.config.train
        size = cfg.eval_batch_size or cfg.micro_batch
        while True:
            try:
                metrics = self._evaluate_at(size)
                break
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
            # Only evaluation shrinks: the training micro-batch is not the one that failed.
            self.events.event("eval_oom", step=self.state.step, old=size, new=(size + 1) // 2)
            print(f"evaluation batch {size} -> {(size + 1) // 2} after OOM at step "
                  f"{self.state.step}", file=sys.stderr, flush=True)
            size = (size + 1) // 2
            cfg.eval_batch_size = size
        metrics = {k: float(v) for k, v in metrics.items()}
        self.state.extra["eval_time_s"] = time.perf_counter() - t0
        self.events.event("eval", step=self.state.step, **metrics)
        self.dispatcher.fire(Event.EVAL_END, self.state, metrics)
        return metrics

    def _evaluate_at(self, size: int) -> dict[str, float]:
        loader = LimitedLoader(eval_loader(self.eval_set, size, self.loader_opts),  # type: ignore[arg-type]
                               self.config.train.eval_batches)
        return evaluate(self.task, self.step_model, loader, self.precision, self.device,
                        self.config.train.seed)

    def _write_run_files(self) -> None:
        resolved = self.config.to_dict()
        resolved["task"] = self.config.task or self.task.name
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(resolved, sort_keys=False))
        env = environment_check(self.config.device).to_dict()
        env["run"] = {"precision": self.precision.describe(), "device": self.device.to_dict(),
                      "max_steps": self.max_steps, "steps_per_epoch": self.steps_per_epoch}
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=2))


class _MemoryEvents(Callback):
    """Every micro-batch change of the OOM guard: a line on stderr and an event."""

    def __init__(self, events: EventLog) -> None:
        self.events = events

    def on_oom_retry(self, state: State, info: dict[str, Any]) -> None:
        why = (f"after OOM in {info['phase']}" if info["reason"] == "oom"
               else "growing back after clean steps")
        print(f"micro-batch {info['old']} -> {info['new']} {why} at step {info['step']}",
              file=sys.stderr, flush=True)
        self.events.event("micro_batch", **info)
