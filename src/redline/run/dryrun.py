"""`redline train --dry-run`: everything a run would do, once, and nothing written.

It checks the environment (as `redline doctor` does), builds the job exactly as training
would (build.py: task, model, precision, optimizer, scheduler, data), draws the first
batch from the loader training draws from (`Job.train_loader`: the same sampler and
collation, so a batch that cannot be made fails here as it would in training), runs two
training steps on it as training steps them (job/runner.py; under memory.budget both run
under it, so a step that runs out of memory once the optimizer's state exists is found
here as training would find it; the second, warm, timed) and one evaluation batch of each
evaluation set (through `Job.eval_loader`, as training), and reports what a real run would
do: the recipe (with the lr the optimizer really starts at, and what the task's own
optimizer or scheduler replaces), the step's time, where its memory goes at the steady
state (job/memory.py: measured on a job built for it, unbudgeted, at the micro-batch)
against the budget (memory.budget, else the device's or the CPU default) and which memory
levers would make it fit, what `distributed.strategy: auto` would pick for the ranks
`--nproc` gives (tuning/strategy_choice.py; one process: ddp, nothing to shard), a
projection of the run's length (labelled as a projection: one
step is not a run), where it would write. No run directory, cache or file is created; the
model trained for two steps is thrown away.

Under fsdp over `--nproc N` ranks (set, or what auto picks) the dry run's one process
holds the whole model, not a rank's shard: its steps run without the per-rank budget, and
the memory line is the breakdown's prediction for a sharded rank (memory/breakdown.py).

Exit codes as `doctor`: 0 when the run can go, 1 when something blocks it (the
environment, an out-of-memory step), 2 for bad input (the config, the task).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from redline import batch as batch_tree
from redline.config import ConfigError, RunConfig
from redline.data import iterate_from
from redline.device import DeviceInfo
from redline.distributed import World
from redline.environment import environment_check
from redline.job.build import build_job
from redline.job.memory import measure_config_breakdown, state_kinds
from redline.job.runner import JobRunner
from redline.memory.breakdown import Breakdown, fit_sentence
from redline.memory.guard import OutOfMemoryAtMinimum
from redline.memory.probe import MemoryBudget, default_budget, format_size, live_tensor_bytes
from redline.run.evaluation import evaluate_sets
from redline.task import Task
from redline.tuning.strategy_choice import choose_strategy


@dataclass
class DryRun:
    ok: bool
    blockers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "blockers": self.blockers, "warnings": self.warnings,
                **self.plan}


def dry_run(config: RunConfig, task: Task, nproc: int | None = None) -> DryRun:
    """Check, build, step once, evaluate once; write nothing (module docstring). `nproc`:
    the ranks the run would have (--nproc), for what strategy auto would pick."""
    env = environment_check(config.device)
    result = DryRun(ok=env.ok, blockers=list(env.blockers), warnings=list(env.warnings))
    if not env.ok:
        return result
    device = DeviceInfo.detect(config.device)
    if config.train.auto_batch:
        result.warnings.append("train.batch_size is auto: a real run searches first (redline "
                               "tune shows what it would pick); this dry run steps with 1")
        config = config.updated({"train.batch_size": 1, "train.effective_batch_size": None})
    ranks = nproc or 1
    strategy = (_strategy(result, config, task, device, ranks)
                if config.distributed.strategy == "auto" else config.distributed.strategy)
    sharded = strategy == "fsdp" and ranks > 1
    if sharded:
        result.warnings.append(f"fsdp over {ranks} ranks: this dry run's one process holds "
                               "the whole model, so its steps ran without the per-rank "
                               "budget; the memory line predicts a sharded rank")
    job = build_job(config, task, device)
    t = config.train
    # training's own loader: a batch it cannot make stops the dry run as it would the run
    batch = batch_tree.move(next(iterate_from(job.train_loader(), 0, 0)), device.torch_device)
    params = sum(p.numel() for p in job.model.parameters())
    eval_samples = sum(len(s) for s in job.eval_sets.values())  # type: ignore[arg-type]
    result.plan = {
        **result.plan,  # what strategy auto would pick, found before the build
        "task": task.name, "device": device.name, "precision": job.precision.name,
        "emulated": job.precision.emulated, "parameters": params,
        "train_samples": len(job.train_set),  # type: ignore[arg-type]
        "eval_samples": eval_samples, "eval_sets": [n for n in job.eval_sets if n],
        "steps": job.max_steps, "steps_per_epoch": job.steps_per_epoch,
        "micro_batch": t.micro_batch, "effective_batch": t.samples_per_step,
        "accumulation_steps": -(-t.samples_per_step // t.micro_batch), "lr": job.lr,
        "optimizer": type(job.optimizer).__name__, "scheduler": type(job.scheduler).__name__,
        "notes": list(job.notes),
        "fp8_layers": sum(d["converted"] for d in job.precision.layer_plan),
        "checkpoint_every": config.checkpoint.every, "trackers": list(config.telemetry.trackers),
    }
    budget = config.memory.budget_bytes
    limit = (MemoryBudget(budget, device, baseline=live_tensor_bytes(job.model, job.optimizer))
             if budget is not None and not sharded else contextlib.nullcontext())
    runner = JobRunner(job)
    failed: str | None = None  # the step that ran out of memory
    done: list[int] = []
    with runner.context(), limit:
        try:
            step_s = _two_steps(runner, batch, done)
        except (torch.OutOfMemoryError, OutOfMemoryAtMinimum):
            failed = f"step {len(done) + 1}"
    if failed is None:
        result.plan.update(step_time_s=step_s, projected_run_s=step_s * job.max_steps)
        if job.engine.micro_batch_size != t.micro_batch:
            result.warnings.append(f"micro-batch {t.micro_batch} ran out of memory; the OOM "
                                   f"guard went on at {job.engine.micro_batch_size} (a real "
                                   "run does the same, with accumulation)")
        if job.eval_sets:
            with runner.context():
                result.plan["eval_metrics"] = sorted(evaluate_sets(
                    job, t.eval_batch_size or t.micro_batch, 1, t.seed))
    del job, runner, batch  # the breakdown builds its own, unbudgeted
    _breakdown(result, config, task, device, failed, ranks if sharded else 1)
    return result


def _strategy(result: DryRun, config: RunConfig, task: Task, device: DeviceInfo,
              ranks: int) -> str:
    """What distributed.strategy auto would pick on `ranks` ranks of this host."""
    try:
        choice = choose_strategy(task, config, device, World(0, ranks, 0, ranks))
    except ConfigError:
        raise
    except Exception as e:  # a diagnostic: it must not hide the dry run's other findings
        result.warnings.append(f"what distributed.strategy auto would pick could not be "
                               f"measured ({type(e).__name__}: {str(e).splitlines()[0]})")
        return "ddp"
    later = "" if ranks > 1 else " (with --nproc N the run would measure for N ranks)"
    result.plan["strategy"] = {**choice.to_dict(), "sentence": (
        f"distributed.strategy auto: {choice.strategy} — {choice.why}{later}")}
    return choice.strategy


def _two_steps(runner: JobRunner, batch: Any, done: list[int]) -> float:
    """The seconds of the second of two optimizer steps on `batch` (the first allocates the
    optimizer's state: under memory.budget both run under it, as training's would)."""
    runner.step_on(batch)
    done.append(1)
    _, took, _ = runner.time(0.0, batch)  # one step, synced
    return took


def _breakdown(result: DryRun, config: RunConfig, task: Task, device: DeviceInfo,
               failed: str | None, sharded_over: int = 1) -> None:
    """The steady-state breakdown at the micro-batch, measured unbudgeted on a job of its
    own, against the budget; a step that ran out of memory is a blocker naming the levers
    that would fit. `sharded_over` > 1: the fit is a sharded rank's, predicted."""
    micro = config.train.micro_batch
    smaller = " or lower train.batch_size" if micro > 1 else ""
    failure = (f"{failed} at micro-batch {micro} ran out of memory under the budget (from "
               "step 2 the optimizer's state is held)")
    try:
        b = measure_config_breakdown(config, task, device, micro)
    except Exception as e:  # a diagnostic: it must not hide the dry run's other findings
        result.warnings.append(f"the memory breakdown could not be measured "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})")
        if failed is not None:
            result.ok = False
            result.blockers.append(f"{failure}; use a memory lever{smaller}")
        return
    limit, source = _budget(config, device)
    fits, sentence = (fit_sentence(b, limit, micro, state_kinds(task, config))
                      if limit is not None else (True, "the budget is unknown"))
    if sharded_over > 1 and limit is not None:
        b.world_size = sharded_over
        rank = replace(b.levers, strategy="fsdp",
                       reshard_after_forward=config.distributed.reshard_after_forward)
        peak = b.predict(rank, micro)
        fits = peak <= limit
        sentence = (f"fits: {'yes' if fits else 'no'}: sharded over {sharded_over} ranks a "
                    f"rank's peak is predicted at {format_size(peak)} ({peak / limit:.0%} "
                    f"of the budget of {format_size(limit)})")
    result.plan.update(step_peak_bytes=b.peak, memory=b.to_dict(),
                       memory_fit={"fits": fits and failed is None, "budget": limit,
                                   "budget_source": source, "sentence": sentence})
    if failed is not None:
        result.ok = False
        why = sentence if not fits else f"{sentence} by the measurement, yet a step failed"
        result.blockers.append(f"{failure}; {why}{smaller}")
    elif not fits:
        result.warnings.append(sentence + smaller)


def _budget(config: RunConfig, device: DeviceInfo) -> tuple[int | None, str]:
    """(bytes, in words): memory.budget, else the device's memory or the CPU default; None
    where neither is known (the device does not say)."""
    if config.memory.budget_bytes is not None:
        return config.memory.budget_bytes, "memory.budget"
    try:
        return default_budget(device)
    except ConfigError as e:
        return None, str(e)


def render(result: DryRun) -> str:
    """What a person reads: the plan, then warnings and blockers."""
    p = result.plan
    lines = []
    if p:
        emulated = " (an emulation: no speed-up)" if p["emulated"] else ""
        lines += [
            f"task       {p['task']}: {p['parameters']:,} parameters; {p['train_samples']} "
            f"training and {p['eval_samples']} evaluation samples",
            f"device     {p['device']}, precision {p['precision']}{emulated}"
            + (f", {p['fp8_layers']} fp8 layer(s)" if p["fp8_layers"] else ""),
            f"recipe     {p['steps']} steps, effective batch {p['effective_batch']} = "
            f"micro-batch {p['micro_batch']} x {p['accumulation_steps']}, lr {p['lr']:.3g} "
            f"({p['optimizer']}, {p['scheduler']})",
        ]
        lines += [f"note       {n}" for n in p["notes"]]
        if "step_time_s" in p:
            lines.append(f"one step   {p['step_time_s']:.3f} s (the second, warm), peak "
                         f"{format_size(p['step_peak_bytes'])} (the steady state: step 2, "
                         f"the optimizer's state present); the run would take about "
                         f"{p['projected_run_s'] / 60:.1f} min of steps (a projection from "
                         "one step, evaluation not included)")
        if "memory" in p:
            fit = p["memory_fit"]
            lines.append("memory     " + Breakdown.from_dict(p["memory"]).render(
                fit["budget"]).replace("\n", "\n           "))
            if fit["budget"] is not None:
                lines.append(f"budget     {format_size(fit['budget'])} "
                             f"({fit['budget_source']}): {fit['sentence']}")
        if "strategy" in p:
            lines.append("strategy   " + p["strategy"]["sentence"])
        if "eval_metrics" in p:
            lines.append("evaluation " + ", ".join(p["eval_metrics"]))
        lines.append(f"writes     checkpoints every {p['checkpoint_every']} steps; trackers "
                     + ", ".join(p["trackers"]) + "; nothing was written by this dry run")
    lines += [f"warning    {w}" for w in result.warnings]
    lines += [f"blocker    {b}" for b in result.blockers]
    lines.append("ok: the run can start" if result.ok else "not ok: fix the blockers above")
    return "\n".join(lines)
