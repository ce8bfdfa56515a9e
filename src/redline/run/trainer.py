"""The training loop: steps and epochs, evaluation, checkpoints, signals, exact resume.

`Trainer.fit` is three parts: set-up (resolve `batch_size: auto`, build the job through
build.py, resume, start telemetry), the loop, and the result. Exact resume rests on four
things being restored together: the parameters and optimizer state, the RNG states
(python, numpy, torch, cuda), the loss scaler, and the position in the data (epoch and
batches consumed; see data.py). With those, a run that is killed and resumed on the CPU
with a fixed seed ends with the same bits as one that was never stopped. Evaluation runs
under a forked, re-seeded RNG so it neither perturbs training nor varies between
evaluations. Callbacks' `state_dict()`s are kept in every checkpoint.

Under torchrun (docs/distributed.md) every rank runs this loop on its share of each batch.
Rank 0 alone writes: it claims the run directory and tells the others its path, and
writes the events, the telemetry and the checkpoints (holding every rank's RNG state).
The ranks stop together: a signal on any rank is agreed on inside the next step
(engine.py), so all finish the same step and save. A failure on one rank makes the others
stop with a sentence naming it (distributed.PeerFailed); the last checkpoint stands, since
saving another would need the rank that is gone. Every rank evaluates the whole
evaluation set (the others would wait for rank 0 anyway); rank 0 records it.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redline import batch as batch_tree
from redline import distributed
from redline.config import ConfigError, RunConfig
from redline.data import LimitedLoader, eval_loader, iterate_from
from redline.distributed import Comm, World
from redline.errors import UserError
from redline.events import Callback, Dispatcher, Event, State
from redline.inspector import Inspector
from redline.job.build import Job, build_job, rank_device
from redline.memory.probe import MemoryBudget, live_tensor_bytes
from redline.run import resume as resume_state
from redline.run import rundir
from redline.run.evaluation import evaluate, evaluate_shrinking
from redline.run.lifecycle import Interrupted, Signals
from redline.run.samples import read_samples, save_samples
from redline.run.watch import MemoryEvents, RunWatch, locate_nonfinite
from redline.task import Task, resolve_task
from redline.telemetry import schema as K
from redline.telemetry.jsonl import EventLog, SilentEventLog, truncate_after
from redline.telemetry.session import Telemetry
from redline.tuning.autobatch import resolve_auto_batch
from redline.tuning.loader_choice import resolve_auto_workers


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
    emulated: bool = False  # the precision is an emulation (fp8-emulated): no speed-up
    ranks: int = 1  # processes that trained together (torchrun)

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
        self.world = World.from_env()
        self.device = rank_device(config.device, self.world)
        # None: a new runs/TASK-TIME directory, made when the run starts
        self.run_dir: Path | None = Path(run_dir) if run_dir else None
        self._made_run_dir = False  # this run created its directory (so may remove it)
        self.resume = resume
        self.user_callbacks = list(callbacks)
        self.progress = progress
        self.budget: MemoryBudget | None = None  # the active memory.budget, during fit

    @property
    def engine(self) -> Any:
        return self.job.engine

    # ---- fit: set-up, loop, result ---------------------------------------------------------

    def fit(self) -> FitResult:
        with contextlib.ExitStack() as held:  # the run directory's lock, event log, writer
            signals = held.enter_context(Signals())
            try:
                resumed = self._prepare(held, signals.check)
                signals.check()
            except Interrupted as stop:
                return self._stopped_in_set_up(stop)
            except UserError:  # bad input found in set-up: leave no empty run behind
                self._remove_made_run_dir()
                raise
            return self._run(resumed, signals)  # the loop: finish the step, save, stop

    def _stopped_in_set_up(self, stop: Interrupted) -> FitResult:
        """A signal during set-up (the batch search): nothing trained, nothing left behind
        but a directory that already held something."""
        print(f"redline: {stop}: nothing was trained", file=sys.stderr, flush=True)
        self._remove_made_run_dir()
        return FitResult(run_dir=str(self.run_dir), steps=0, samples=0, final_loss=None,
                         precision=self.config.precision.name, device=self.device.name,
                         interrupted=stop.signal)

    def _remove_made_run_dir(self) -> None:
        if self.run_dir is not None and self._made_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _run(self, resumed: int | None, signals: Signals) -> FitResult:
        interrupted: str | None = None
        last_saved: Path | None = None
        metrics: dict[str, float] = {}
        try:
            with self.job.precision.global_context(), self._budget() as self.budget:
                self.telemetry.start(self.state.step)
                self.dispatcher.fire(Event.FIT_START, self.state)
                self._loop(signals)
                if self.state.step > 0:
                    last_saved = self.save_checkpoint()
                if self.job.engine.checked_peaks:
                    self.events.event("memory_checked", peaks=self.job.engine.checked_peaks)
                # under torchrun a rank may stop for another rank's signal: as if it had one
                stopped = signals.received or (self.world.distributed and self.state.step <
                                               self.job.max_steps and "SIGTERM")
                if stopped:
                    interrupted = str(stopped)
                    self.events.event("interrupted", signal=interrupted, step=self.state.step)
                elif self.job.eval_set is not None:
                    metrics = self.evaluate()
                    self._save_samples()
                self.telemetry.finish()
                self.dispatcher.fire(Event.FIT_END, self.state)
        except BaseException as exc:
            self.checkpoints.after_failure(exc)
            raise
        finally:
            self.telemetry.close()  # flushes the sinks, stops the sampler and progress bar
        last = self.telemetry.last
        return FitResult(
            run_dir=str(self.run_dir), steps=self.state.step, samples=self.state.samples_seen,
            final_loss=last.get("loss"), precision=self.job.precision.name,
            device=self.device.name, eval=metrics, resumed_from=resumed,
            interrupted=interrupted, checkpoint=str(last_saved) if last_saved else None,
            samples_per_s=last.get("samples_per_s"), mfu=last.get("mfu"),
            overhead_pct=last.get("redline/overhead_pct"), emulated=self.job.precision.emulated,
            ranks=self.world.size)

    def _prepare(self, held: contextlib.ExitStack, check: Callable[[], None]) -> int | None:
        """Run directory, batch search, the job, resume and telemetry; the resumed step.

        What it opens (the directory's lock, the event log, the telemetry writer) goes on
        `held`, which closes it however the run ends; `check()` raises Interrupted if a
        signal came (called between the batch search's trials)."""
        self.comm: Comm = distributed.init(self.world, self.device.kind)
        main = self.world.main
        claimed = self.comm.from_main(lambda: rundir.claim(self.run_dir, self.task.name,
                                                           self.resume, held))
        self.run_dir, self._made_run_dir = claimed[0], claimed[1] and main
        tuned = None
        if self.config.train.auto_batch:
            self.config, tuned = resolve_auto_batch(self.task, self.config, self.device,
                                                    self.run_dir, self.resume, self.progress,
                                                    check, self.comm)
        self.config, loader_auto = resolve_auto_workers(
            self.task, self.config, self.device, main,
            self.run_dir / "config.yaml" if self.resume else None)
        self.events = held.enter_context(EventLog(self.run_dir / "events.jsonl") if main
                                         else SilentEventLog())
        self.state = State(run_dir=str(self.run_dir))
        self.dispatcher = Dispatcher([MemoryEvents(self.events), *self.user_callbacks])
        self.job: Job = build_job(self.config, self.task, self.device,
                                  dispatcher=self.dispatcher, state=self.state, comm=self.comm)
        self.state.model, self.state.optimizer = self.job.model, self.job.optimizer
        self.state.max_steps = self.job.max_steps
        self.loader = self.job.train_loader()
        self.dispatcher.add(RunWatch(self.config.train, self.events, functools.partial(
            locate_nonfinite, self.job, self.loader)))
        if self.config.inspect.enabled and self.world.main:  # rank 0's layers stand for all
            drawn = {"tensorboard", "wandb"} & set(self.config.telemetry.trackers)
            self.dispatcher.add(Inspector(
                self.config.inspect, self.run_dir, getattr(self.task, "series", None),
                self.job.precision.forward_context,
                publish=(lambda step, h: self.telemetry.histograms(step, h)) if drawn else None))
        self._eval_batch = self.config.train.eval_batch_size or self.config.train.micro_batch
        skipped: list[str] = []
        self.checkpoints = resume_state.Checkpoints(self.job, self.state, self.run_dir,
                                                    self.events, self.dispatcher,
                                                    self.user_callbacks)
        found = self.checkpoints.load(skipped) if self.resume else None
        start = int(found[1]["step"]) if found else 0
        # Each step once in metrics.jsonl: rows past the step this run starts from belong to
        # an attempt that died after its last checkpoint (a kill -9, a crash).
        if main:
            truncate_after(self.run_dir / "metrics.jsonl", start)
            truncate_after(self.run_dir / "ranks.jsonl", start)
        # chosen here, so checkpoints hold it before a tracker has answered (a resumed run
        # continues its first start's)
        run_id = (found[1].get("tracker_run_id") if found else None) or uuid.uuid4().hex[:8]
        self.telemetry = self.checkpoints.telemetry = self._telemetry(run_id, start)
        held.callback(self.telemetry.close)  # closing twice is harmless
        for path in skipped:
            self.dispatcher.fire(Event.ANOMALY, self.state,
                                 {"kind": "corrupt_checkpoint", "path": path})
        if tuned is not None:
            self.events.event("autobatch", **tuned)
        if loader_auto:
            self.events.event("loader_auto", **loader_auto)
        if main:
            rundir.write_start_files(self.run_dir, self.config, self.task.name, {
                "precision": self.job.precision.describe(), "device": self.device.to_dict(),
                "max_steps": self.job.max_steps, "steps_per_epoch": self.job.steps_per_epoch,
                "ranks": self.world.size})
        resumed = self.checkpoints.apply(*found) if found else None
        self.events.event("run_start", step=self.state.step, max_steps=self.job.max_steps,
                          precision=self.job.precision.name, device=self.device.name,
                          **({"ranks": self.world.size} if self.world.distributed else {}))
        if main:
            rundir.announce(self.events, self.job.precision, self.job.memory_limit,
                            self.config.memory.budget_bytes if self.device.kind == "cpu"
                            else None)
        self._count_flops()
        return resumed

    def _telemetry(self, tracker_run_id: str | None, start_step: int) -> Telemetry:
        t = self.config.train
        return Telemetry(
            self.run_dir, self.config.telemetry, device=self.device,
            samples_per_step=t.samples_per_step, max_steps=self.job.max_steps,
            compute_dtype=self.job.precision.compute_dtype_name,
            memory_total=self.config.memory.budget_bytes or self.device.memory_total,
            memory_tracker=lambda: getattr(self.budget, "tracker", None), events=self.events,
            progress=self.progress, run_id=tracker_run_id, run_name=self.run_dir.name,
            start_step=start_step,
            on_window=lambda record: self.dispatcher.fire(Event.WINDOW, self.state, record),
            skip_nonfinite=t.on_nonfinite != "warn",
            loss_scaled=self.job.precision.scales_loss,
            labels={K.EMULATED: 1} if self.job.precision.emulated else None,
            comm=self.comm, sync_wait=lambda: self.job.engine.sync_wait_s)

    def _count_flops(self) -> None:
        declared = getattr(self.task, "flops_per_sample", None)
        if declared is not None:  # e.g. analytic_transformer_flops, for varying shapes
            self.telemetry.set_flops(int(declared() * self.config.train.samples_per_step))
            return
        n = min(self.config.train.micro_batch, len(self.job.train_set))  # type: ignore[arg-type]
        batch = batch_tree.move(batch_tree.first_samples(self.job.train_set, n),
                                self.device.torch_device)
        # Counted on the bare module: under DDP its backward hooks would all-reduce, and a
        # compiled module called under the counter's dispatch modes would never compile
        # (dynamo skips a forward first called inside a TorchDispatchMode, for good).
        self.telemetry.count_flops(self.job.model, batch, self.task.loss, n)

    def _budget(self) -> contextlib.AbstractContextManager[Any]:
        """memory.budget enforced around the loop (on CPU: every op tracked, slower)."""
        budget = self.config.memory.budget_bytes
        if budget is None:
            return contextlib.nullcontext()
        return MemoryBudget(budget, self.device,
                            baseline=live_tensor_bytes(self.job.model, self.job.optimizer))

    def _loop(self, signals: Signals) -> None:
        cfg = self.config
        device = self.device.torch_device
        non_blocking = bool(self.job.loader_options.get("pin_memory"))
        # A loader's batches are on the CPU already: Tensor.to would only cost ~5 us a step.
        move = device.type != "cpu"
        loss_fn, engine, record_step = self.task.loss, self.job.engine, self.telemetry.record_step
        optimizer, per_step = self.job.optimizer, cfg.train.samples_per_step
        # The handlers, looked up once: an event nobody listens to costs nothing per step.
        on_batch_start = self.dispatcher.table[Event.BATCH_START]
        on_step_end = self.dispatcher.table[Event.STEP_END]
        state, max_steps = self.state, self.job.max_steps
        # Under torchrun the ranks stop after the step in which they agreed to (engine.py).
        engine.stop_requested = self.telemetry.stop_requested = (
            lambda: signals.received is not None)
        stopping: Callable[[], Any] = (
            (lambda: engine.stop_agreed or self.telemetry.stop_agreed)
            if self.world.distributed else (lambda: signals.received))
        while state.step < max_steps and not stopping():
            if state.batch_in_epoch == 0:
                self.dispatcher.fire(Event.EPOCH_START, state)
            batches = iterate_from(self.loader, state.epoch, state.batch_in_epoch)
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                wait = time.perf_counter() - t  # the host waited on the loader
                if batch is None:
                    break
                if move:
                    batch = batch_tree.move(batch, device, non_blocking)
                for handler in on_batch_start:
                    handler(state, batch)
                loss = engine.step(batch, loss_fn)
                state.step += 1
                state.batch_in_epoch += 1
                state.samples_seen += per_step
                for handler in on_step_end:
                    handler(state, loss)
                step = state.step
                record_step(step, loss, engine.grad_norm, engine.micro_batch_size,
                            optimizer.param_groups[0]["lr"], state.epoch, state.samples_seen,
                            wait)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                        and step < max_steps:
                    self.evaluate()
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 \
                        and step < max_steps:
                    self.save_checkpoint()
                if stopping() or step >= max_steps:
                    break
            # An epoch whose last batch is also the run's last step ends too.
            if state.batch_in_epoch >= (self.job.steps_per_epoch or 0):
                self.dispatcher.fire(Event.EPOCH_END, state)
                state.epoch += 1
                state.batch_in_epoch = 0

    # ---- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluation loss and the task's metrics on the evaluation set."""
        if self.job.eval_set is None:
            return {}
        with self.telemetry.paused():
            t0 = time.perf_counter()
            metrics, self._eval_batch = evaluate_shrinking(self._evaluate_at, self._eval_batch,
                                                           self._eval_shrunk)
            self.telemetry.record_eval(self.state.step, metrics, time.perf_counter() - t0)
            self.events.event("eval", step=self.state.step, **metrics)
        self.dispatcher.fire(Event.EVAL_END, self.state, metrics)
        return metrics

    def _save_samples(self) -> None:
        if self.config.train.samples and self.job.eval_set is not None and self.world.main:
            with self.telemetry.paused():
                save_samples(self.task, self.job.step_model, self.job.eval_set,
                             self.job.precision, self.device, self.run_dir / "samples",
                             self.config.train.samples, self.config.train.seed)
            if "wandb" in self.config.telemetry.trackers:
                self.telemetry.samples(self.state.step, read_samples(self.run_dir))

    def _eval_shrunk(self, old: int, new: int) -> None:
        # Only evaluation shrinks: the training micro-batch is not the one that failed.
        self.events.event("eval_oom", step=self.state.step, old=old, new=new)
        print(f"evaluation batch {old} -> {new} after OOM at step {self.state.step}",
              file=sys.stderr, flush=True)

    def _evaluate_at(self, size: int) -> dict[str, float]:
        loader = LimitedLoader(eval_loader(self.job.eval_set, size, self.job.loader_options),  # type: ignore[arg-type]
                               self.config.train.eval_batches)
        return evaluate(self.task, self.job.step_model, loader, self.job.precision,
                        self.device, self.config.train.seed)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save the run's state now (every rank under torchrun: rank 0 writes)."""
        return self.checkpoints.save()
