"""A training run's set-up: everything `Trainer.fit` runs on, built in one place.

`prepare` takes the claimed run directory and returns `RunParts`, in this order:

    config     distributed.strategy auto, train.batch_size auto,
               memory.activation_checkpointing auto and data.num_workers auto resolved
               (the strategy choice, the batch search, the memory plan and the loader
               choice, tuning/), the resolved config used from here on
    events     events.jsonl (rank 0; the others keep none)
    job        build.py's, with the run's dispatcher and state; a JobRunner over its
               exact-resume loader (job/runner.py)
    resume     the checkpoint rank 0 picked (resume.find); metrics past its step dropped
    telemetry  the run's, with the tracker run id the checkpoint kept (or a new one)
    checkpoints  resume.Checkpoints, given the telemetry; the checkpoint applied
    start      config.yaml and environment.json (with the optimizer's real lr, and what the
               task's optimizer or scheduler replaces), run_start, what a user must know
    flops      counted once, for MFU; the memory budget built (entered by the loop)

What it opens goes on `held` (an ExitStack the trainer closes however the run ends).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from redline import batch as batch_tree
from redline.checkpoint import list_checkpoints
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.distributed import Comm
from redline.events import Callback, Dispatcher, Event, State
from redline.inspector import Inspector
from redline.job.build import Job, build_job, counting_model
from redline.job.runner import JobRunner
from redline.memory.probe import MemoryBudget, live_tensor_bytes
from redline.memory.sharding import is_sharded
from redline.run import resume as resume_state
from redline.run import rundir
from redline.run.watch import MemoryEvents, RunWatch, locate_nonfinite
from redline.task import Task, task_member
from redline.telemetry import schema as K
from redline.telemetry.jsonl import EventLog, SilentEventLog, truncate_after
from redline.telemetry.session import Telemetry
from redline.tuning.autobatch import resolve_auto_batch
from redline.tuning.loader_choice import resolve_auto_workers
from redline.tuning.memory_plan_run import resolve_auto_levers
from redline.tuning.strategy_choice import resolve_auto_strategy


@dataclass
class RunParts:
    """What one `Trainer.fit` holds, built by `prepare`."""

    config: RunConfig  # resolved: the batch size and loader workers the run trains with
    run_dir: Path
    job: Job
    runner: JobRunner  # the job stepped by its exact-resume loader
    state: State
    events: EventLog
    dispatcher: Dispatcher
    checkpoints: resume_state.Checkpoints
    telemetry: Telemetry
    budget: MemoryBudget | None  # memory.budget, entered around the loop
    resumed: int | None  # the step a resumed run continues from
    eval_batch: int  # the evaluation batch; evaluation shrinks it after an OOM


def prepare(config: RunConfig, task: Task, device: DeviceInfo, run_dir: Path, comm: Comm,
            *, resume: bool, callbacks: Iterable[Callback], progress: bool | None,
            held: contextlib.ExitStack, check: Callable[[], None]) -> RunParts:
    """The run's parts (module docstring); `check()` raises Interrupted if a signal came
    (called between the batch search's trials)."""
    main = comm.world.main
    config, found_events = _resolve(config, task, device, run_dir, comm, resume, progress,
                                    check)
    events = held.enter_context(EventLog(run_dir / "events.jsonl") if main
                                else SilentEventLog())
    state = State(run_dir=str(run_dir))
    user = list(callbacks)
    dispatcher = Dispatcher([MemoryEvents(events), *user])
    job = build_job(config, task, device, dispatcher=dispatcher, state=state, comm=comm)
    state.model, state.optimizer, state.max_steps = job.model, job.optimizer, job.max_steps
    runner = JobRunner(job, job.train_loader())
    # a sharded model cannot be copied to re-run a step (FSDP refuses deepcopy)
    locate = (None if is_sharded(job.model)
              else functools.partial(locate_nonfinite, job, runner.loader))
    dispatcher.add(RunWatch(config.train, events, locate, job.engine.scaler_watch,
                            sharded=resume_state.writes_sharded(job)))
    skipped: list[str] = []
    found = resume_state.find(job, run_dir, events, skipped) if resume else None
    start = int(found[1]["step"]) if found else 0
    # Each step once in metrics.jsonl: rows past the step this run starts from belong to
    # an attempt that died after its last checkpoint (a kill -9, a crash).
    if main:
        truncate_after(run_dir / "metrics.jsonl", start)
        truncate_after(run_dir / "ranks.jsonl", start)
    # chosen here, so checkpoints hold it before a tracker has answered (a resumed run
    # continues its first start's)
    run_id = (found[1].get("tracker_run_id") if found else None) or uuid.uuid4().hex[:8]
    budget: MemoryBudget | None = None  # built last, once the optimizer's state is loaded
    telemetry = _telemetry(config, job, run_dir, events, dispatcher, state, progress, run_id,
                           start, lambda: getattr(budget, "tracker", None))
    held.callback(telemetry.close)  # closing twice is harmless
    if config.inspect.enabled and main:  # rank 0's layers stand for all
        drawn = {"tensorboard", "wandb"} & set(config.telemetry.trackers)
        # the task's series run a forward, which a sharded model's ranks would all join
        series = None if is_sharded(job.model) else task_member(task, "series")
        dispatcher.add(Inspector(config.inspect, run_dir, series,
                                 job.precision.forward_context,
                                 publish=telemetry.histograms if drawn else None))
    checkpoints = resume_state.Checkpoints(job, state, run_dir, events, dispatcher, user,
                                           telemetry)
    for path in skipped:
        dispatcher.fire(Event.ANOMALY, state, {"kind": "corrupt_checkpoint", "path": path})
    for name, fields in found_events:
        events.event(name, **fields)
    _start(config, task, job, run_dir)
    resumed = checkpoints.restore(*found) if found else None
    _announce(config, job, events, state)
    _count_flops(config, task, job, telemetry)
    if config.memory.budget_bytes is not None:
        budget = MemoryBudget(config.memory.budget_bytes, device,
                              baseline=live_tensor_bytes(job.model, job.optimizer))
    return RunParts(config=config, run_dir=run_dir, job=job, runner=runner, state=state,
                    events=events, dispatcher=dispatcher, checkpoints=checkpoints,
                    telemetry=telemetry, budget=budget, resumed=resumed,
                    eval_batch=config.train.eval_batch_size or config.train.micro_batch)


def _resolve(config: RunConfig, task: Task, device: DeviceInfo, run_dir: Path, comm: Comm,
             resume: bool, progress: bool | None, check: Callable[[], None]
             ) -> tuple[RunConfig, list[tuple[str, dict[str, Any]]]]:
    """`config` with `auto` settings resolved, and the events saying what was chosen.
    distributed.strategy first: how the model is spread sets what a rank holds."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    config, strategy = resolve_auto_strategy(task, config, device, comm, run_dir, resume)
    if strategy is not None:
        chosen.append(("strategy_auto", strategy))
    if config.train.auto_batch:
        config, tuned = resolve_auto_batch(task, config, device, run_dir, resume, progress,
                                           check, comm)
        if tuned is not None:
            chosen.append(("autobatch", tuned))
    elif config.memory.activation_checkpointing == "auto":  # at the configured micro-batch
        config, planned = resolve_auto_levers(task, config, device,
                                              _first_memory(run_dir) if resume else None,
                                              comm.world.main, world_size=comm.world.size)
        chosen.append(("memory_plan", planned))
    config, loader_auto = resolve_auto_workers(task, config, device, comm.world.main,
                                               run_dir / "config.yaml" if resume else None)
    if loader_auto:
        chosen.append(("loader_auto", loader_auto))
    return config, chosen


def _first_memory(run_dir: Path) -> dict[str, Any] | None:
    """A resumed run's memory section as its first start wrote it (config.yaml), where a
    checkpoint exists to resume from; else None (the plan runs)."""
    saved = run_dir / "config.yaml"
    if not (saved.is_file() and list_checkpoints(run_dir / "checkpoints")):
        return None
    return dict(yaml.safe_load(saved.read_text()).get("memory") or {})


def _telemetry(config: RunConfig, job: Job, run_dir: Path, events: EventLog,
               dispatcher: Dispatcher, state: State, progress: bool | None, run_id: str,
               start_step: int, memory_tracker: Callable[[], Any]) -> Telemetry:
    t, precision = config.train, job.precision
    return Telemetry(
        run_dir, config.telemetry, device=job.device,
        samples_per_step=t.samples_per_step, max_steps=job.max_steps,
        compute_dtype=precision.compute_dtype_name,
        memory_total=config.memory.budget_bytes or job.device.memory_total,
        memory_tracker=memory_tracker, events=events,
        progress=progress, run_id=run_id, run_name=run_dir.name,
        start_step=start_step,
        on_window=lambda record: dispatcher.fire(Event.WINDOW, state, record),
        skip_nonfinite=t.on_nonfinite != "warn",
        loss_scaled=precision.scales_loss,
        labels={K.EMULATED: 1} if precision.emulated else None,
        comm=job.comm, sync_wait=lambda: job.engine.sync_wait_s,
        comm_time=(lambda: job.collectives.seconds) if job.collectives else None)


def _start(config: RunConfig, task: Task, job: Job, run_dir: Path) -> None:
    """config.yaml and environment.json (rank 0)."""
    if job.world.main:
        rundir.write_start_files(run_dir, config, task.name, {
            "precision": job.precision.describe(), "device": job.device.to_dict(),
            "max_steps": job.max_steps, "steps_per_epoch": job.steps_per_epoch,
            "ranks": job.world.size, "optimizer": type(job.optimizer).__name__,
            "scheduler": type(job.scheduler).__name__, "lr": job.lr}, job.notes)


def _announce(config: RunConfig, job: Job, events: EventLog, state: State) -> None:
    """run_start, and on rank 0 what a user must know before the first step."""
    world, device = job.world, job.device
    events.event("run_start", step=state.step, max_steps=job.max_steps,
                 precision=job.precision.name, device=device.name,
                 **({"ranks": world.size} if world.distributed else {}))
    if world.main:
        rundir.announce(events, job.precision, job.memory_limit,
                        config.memory.budget_bytes if device.kind == "cpu" else None)
        for note in job.notes:  # the task's optimizer or scheduler replaces config's
            print(f"redline: {note}", file=sys.stderr, flush=True)
        if job.notes:
            events.event("task_overrides", notes=job.notes, lr=job.lr)


def _count_flops(config: RunConfig, task: Task, job: Job, telemetry: Telemetry) -> None:
    declared = task_member(task, "flops_per_sample")
    if declared is not None:  # e.g. analytic_transformer_flops, for varying shapes
        telemetry.set_flops(int(declared() * config.train.samples_per_step))
        return
    n = min(config.train.micro_batch, len(job.train_set))  # type: ignore[arg-type]
    batch = batch_tree.move(batch_tree.first_samples(job.train_set, n),
                            job.device.torch_device)
    # Counted on the bare module: under DDP its backward hooks would all-reduce, and a
    # compiled module called under the counter's dispatch modes would never compile
    # (dynamo skips a forward first called inside a TorchDispatchMode, for good). A
    # sharded model's forward all-gathers, which rank 0 alone would wait in for ever: its
    # unsharded twin on the meta device is counted instead, the whole model once.
    telemetry.count_flops(counting_model(job), batch, task.loss, n,
                          job.device.torch_device)
