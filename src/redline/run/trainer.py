"""The training loop: steps and epochs, evaluation, checkpoints, signals, exact resume.

`Trainer` holds only its inputs (the config, the task, the rank's device, the run
directory asked for). `Trainer.fit` is three parts: set-up (run/setup.py: claim the run
directory, resolve `batch_size: auto`, build the job through build.py, resume, start
telemetry), which returns one `RunParts`; the loop, which steps the job through
job/runner.py's JobRunner (the code tune's trials and the dry run step with), around it
the callbacks and telemetry; and the result. Exact resume rests on four
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
(engine/ranks.py), so all finish the same step and save. A failure on one rank makes the others
stop with a sentence naming it (distributed.PeerFailed); the last checkpoint stands, since
saving another would need the rank that is gone. Every rank evaluates the whole
evaluation set (the others would wait for rank 0 anyway); rank 0 records it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redline import distributed
from redline.config import ConfigError, RunConfig
from redline.distributed import World
from redline.errors import UserError
from redline.events import Callback, Event
from redline.job.build import rank_device
from redline.memory.guard import OutOfMemoryAtMinimum
from redline.memory.sharding import is_sharded
from redline.run import rundir
from redline.run.evaluation import evaluate_sets, evaluate_shrinking
from redline.run.oom import explain_oom
from redline.run.samples import read_samples, save_samples
from redline.run.setup import RunParts, prepare
from redline.run.signals import Interrupted, Signals
from redline.task import Task, check_task, resolve_task


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
    hfu: float | None = None  # the last window's, recomputation included; None: none reran
    overhead_pct: float | None = None  # redline's own time on the training thread, last window
    emulated: bool = False  # the precision is an emulation (fp8-emulated): no speed-up
    ranks: int = 1  # processes that trained together (torchrun)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Trains `config.task` (or a Task object) and writes a run directory.

        result = Trainer(load_config("run.yaml"), run_dir="runs/exp1").fit()

    `resume=True` without `run_dir` continues the task's latest run under runs/.
    """

    def __init__(self, config: RunConfig, task: Task | None = None,
                 run_dir: str | Path | None = None, resume: bool = False,
                 callbacks: Iterable[Callback] = (), progress: bool | None = None) -> None:
        if task is None:
            if not config.task:
                raise ConfigError("no task given: name one (e.g. redline train sr3-tiny) "
                                  "or set 'task' in the config file")
            task = resolve_task(config.task, config.task_args)  # checks the task too
        else:
            task = check_task(task)  # a task object handed in: the same check
        self.config = config  # as given; fit's parts hold the resolved one
        self.task = task
        self.world = World.from_env()
        self.device = rank_device(config.device, self.world)
        self.resume = resume
        # None: a new runs/TASK-TIME directory, made when the run starts
        self.run_dir: Path | None = rundir.chosen(run_dir, task.name, resume)
        self.user_callbacks = list(callbacks)
        self.progress = progress
        self.parts: RunParts | None = None  # what fit() built: the job, telemetry, state

    @property
    def engine(self) -> Any:
        """The job's engine (for a callback during fit)."""
        if self.parts is None:
            raise RuntimeError("the trainer's engine is built by fit(): call it from a "
                               "callback, or after fit")
        return self.parts.job.engine

    # ---- fit: set-up, loop, result ---------------------------------------------------------

    def fit(self) -> FitResult:
        with contextlib.ExitStack() as held:  # the run directory's lock, event log, writer
            signals = held.enter_context(Signals())
            comm = distributed.init(self.world, self.device.kind)
            run_dir, made = comm.from_main(lambda: rundir.claim(self.run_dir, self.task.name,
                                                                self.resume, held))
            made = made and self.world.main  # this run created it (so may remove it)
            try:
                parts = prepare(self.config, self.task, self.device, run_dir, comm,
                                resume=self.resume, callbacks=self.user_callbacks,
                                progress=self.progress, held=held, check=signals.check)
                signals.check()
            except Interrupted as stop:
                # A signal during set-up (the batch search): nothing trained, nothing left
                # behind but a directory that already held something.
                print(f"redline: {stop}: nothing was trained", file=sys.stderr, flush=True)
                _remove(run_dir, made)
                return FitResult(run_dir=str(run_dir), steps=0, samples=0, final_loss=None,
                                 precision=self.config.precision.name,
                                 device=self.device.name, interrupted=stop.signal)
            except UserError:  # bad input found in set-up: leave no empty run behind
                held.close()  # first: telemetry's sampler writes as it closes
                _remove(run_dir, made)
                raise
            self.parts = parts
            return self._run(parts, signals)  # the loop: finish the step, save, stop

    def _run(self, run: RunParts, signals: Signals) -> FitResult:
        interrupted: str | None = None
        last_saved: Path | None = None
        metrics: dict[str, float] = {}
        job, state, events = run.job, run.state, run.events
        try:
            with run.runner.context(), run.budget or contextlib.nullcontext():
                run.telemetry.start(state.step)
                run.dispatcher.fire(Event.FIT_START, state)
                self._loop(run, signals)
                if state.step > 0:
                    last_saved = run.checkpoints.save()
                if job.engine.checked_peaks:
                    events.event("memory_checked", peaks=job.engine.checked_peaks)
                # under torchrun a rank may stop for another rank's signal: as if it had one
                stopped = signals.received or (self.world.distributed and state.step <
                                               job.max_steps and "SIGTERM")
                if stopped:
                    interrupted = str(stopped)
                    events.event("interrupted", signal=interrupted, step=state.step)
                elif job.eval_set is not None:
                    metrics = self.evaluate()
                    self._save_samples(run)
                run.telemetry.finish()
                run.dispatcher.fire(Event.FIT_END, state)
        except BaseException as exc:
            run.checkpoints.after_failure(exc)
            if isinstance(exc, OutOfMemoryAtMinimum) and not self.world.distributed:
                raise explain_oom(exc, job, run.run_dir, run.checkpoints.last_saved) from None
            raise
        finally:
            run.telemetry.close()  # flushes the sinks, stops the sampler and progress bar
        last = run.telemetry.last
        return FitResult(
            run_dir=str(run.run_dir), steps=state.step, samples=state.samples_seen,
            final_loss=last.get("loss"), precision=job.precision.name,
            device=self.device.name, eval=metrics, resumed_from=run.resumed,
            interrupted=interrupted, checkpoint=str(last_saved) if last_saved else None,
            samples_per_s=last.get("samples_per_s"), mfu=last.get("mfu"), hfu=last.get("hfu"),
            overhead_pct=last.get("redline/overhead_pct"), emulated=job.precision.emulated,
            ranks=self.world.size)

    def _loop(self, run: RunParts, signals: Signals) -> None:
        train, every = run.config.train, run.config.checkpoint.every
        runner, state, dispatcher = run.runner, run.state, run.dispatcher
        engine, telemetry, optimizer = run.job.engine, run.telemetry, run.job.optimizer
        record_step, step_on_next, per_step = (telemetry.record_step, runner.step,
                                               train.samples_per_step)
        # The handlers, looked up once: an event nobody listens to costs nothing per step.
        on_batch_start = dispatcher.table[Event.BATCH_START]
        on_step_end = dispatcher.table[Event.STEP_END]
        max_steps = run.job.max_steps
        # Under torchrun the ranks stop after the step in which they agreed to (engine/ranks.py).
        engine.stop_when(lambda: signals.received is not None)
        telemetry.stop_when(lambda: signals.received is not None)
        stopping: Callable[[], Any] = (
            (lambda: engine.stop_agreed or telemetry.stop_agreed)
            if self.world.distributed else (lambda: signals.received))
        while state.step < max_steps and not stopping():
            if state.batch_in_epoch == 0:
                dispatcher.fire(Event.EPOCH_START, state)
            runner.begin_epoch(state.epoch, state.batch_in_epoch)
            while True:
                loss = step_on_next(on_batch_start, state)
                if loss is None:
                    break
                state.step += 1
                state.batch_in_epoch += 1
                state.samples_seen += per_step
                for handler in on_step_end:
                    handler(state, loss)
                step = state.step
                record_step(step, loss, engine.grad_norm, engine.micro_batch_size,
                            optimizer.param_groups[0]["lr"], state.epoch, state.samples_seen,
                            runner.wait)
                if train.eval_every and step % train.eval_every == 0 and step < max_steps:
                    self.evaluate()
                if every and step % every == 0 and step < max_steps:
                    run.checkpoints.save()
                if stopping() or step >= max_steps:
                    break
            # An epoch whose last batch is also the run's last step ends too.
            if state.batch_in_epoch >= (run.job.steps_per_epoch or 0):
                dispatcher.fire(Event.EPOCH_END, state)
                state.epoch += 1
                state.batch_in_epoch = 0

    # ---- evaluation ----------------------------------------------------------------------

    def _active(self) -> RunParts:
        if self.parts is None:
            raise RuntimeError("the trainer has no run yet: call fit()")
        return self.parts

    def evaluate(self) -> dict[str, float]:
        """Evaluation loss and the task's metrics on each evaluation set (during fit):
        `<set>/<metric>` for a task's named sets (run/evaluation.py)."""
        run = self._active()
        if run.job.eval_set is None:
            return {}
        with run.telemetry.paused():
            t0 = time.perf_counter()
            metrics, run.eval_batch = evaluate_shrinking(
                lambda size: self._evaluate_at(run, size), run.eval_batch,
                lambda old, new: _eval_shrunk(run, old, new))
            run.telemetry.record_eval(run.state.step, metrics, time.perf_counter() - t0)
            run.events.event("eval", step=run.state.step, **metrics)
        run.dispatcher.fire(Event.EVAL_END, run.state, metrics)
        return metrics

    def _save_samples(self, run: RunParts) -> None:
        train, job = run.config.train, run.job
        # rank 0 writes them; a sharded model's forward all-gathers, so every rank runs it
        runs = self.world.main or is_sharded(job.model)
        if train.samples and job.eval_set is not None and runs:
            with run.telemetry.paused():
                save_samples(self.task, job.step_model, job.eval_set, job.precision,
                             self.device, run.run_dir / "samples" if self.world.main
                             else None, train.samples, train.seed)
            if "wandb" in run.config.telemetry.trackers and self.world.main:
                run.telemetry.samples(run.state.step, read_samples(run.run_dir))

    def _evaluate_at(self, run: RunParts, size: int) -> dict[str, float]:
        train = run.config.train
        return evaluate_sets(run.job, size, train.eval_batches, train.seed)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save the run's state now (every rank under torchrun: rank 0 writes)."""
        return self._active().checkpoints.save()


def _eval_shrunk(run: RunParts, old: int, new: int) -> None:
    # Only evaluation shrinks: the training micro-batch is not the one that failed.
    step = run.state.step
    run.events.event("eval_oom", step=step, old=old, new=new)
    print(f"evaluation batch {old} -> {new} after OOM at step {step}", file=sys.stderr,
          flush=True)


def _remove(run_dir: Path, made: bool) -> None:
    """Remove the run directory if this run made it."""
    if made:
        shutil.rmtree(run_dir, ignore_errors=True)
