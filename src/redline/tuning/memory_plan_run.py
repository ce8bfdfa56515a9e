"""The memory plan measured: the breakdown, the candidates' real steps, the verification.

memory_plan.py decides from numbers; this module gets them, on the user's machine and
model, in these steps:

  breakdown  one measuring job (checkpointing installed switched off, fp32 AdamW state,
             each batch run whole) steps a small micro-batch at the steady state
             (job/memory.py's measure_job_breakdown: the optimizer's state present, per
             block activations in each checkpointing mode); every combination is
             predicted from it. Where the start fits already the plan ends here.
  timing     the surviving candidates, each as the config training would run (its levers,
             its micro-batch, the effective batch kept by the recipe), timed side by side
             through trial.py's runners (JobRunner, warm-up excluded: torchao's low-bit
             step compiles on its first step), then one tracked steady-state step each
             for the measured peak in the table.
  verify     a candidate whose measured peak is over the budget is dropped (the
             prediction missed it). The choice, built afresh without the OOM guard,
             steps twice under the budget (memory/probe.py's MemoryBudget: on a CPU a
             real OutOfMemoryError; the second step has the optimizer's state), each
             step two micro-batches where the recipe accumulates (the gradients held
             while the next micro-batch runs are the accumulation's peak; more would
             only repeat it); on an OOM the next is taken, and the table says so.
  ranks      planned for N ranks with more than one strategy surviving: instead of the
             timing and the verification, the leading survivors train on the N ranks
             (rank_timing.py: real launches, communication included; an OOM there is
             "does not fit"), and the choice goes by those rates; where none could be
             measured, the timing above (fsdp rows then projections).
  budget     `fits(seconds)` (tune's Clock) is asked before the timing; where it does
             not fit, the candidate with the fewest levers is taken untimed and verified.

Tracked steps run their compiled code eagerly (the CPU tracker sees to it:
`_torch_compat.compiled_runs_eagerly`): torchao's AdamW8bit / AdamW4bit compile their step
with fullgraph=True, which fails inside a TorchDispatchMode; eagerly they run and are
tracked, and later untracked steps compile.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from redline import batch as batch_tree
from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.job.build import Job, build_job
from redline.job.memory import measure_job_breakdown, planned_states
from redline.job.runner import JobRunner
from redline.memory.breakdown import Breakdown
from redline.memory.levers import Levers
from redline.memory.probe import (
    MemoryBudget,
    default_budget,
    format_size,
    live_tensor_bytes,
    measure_peak,
)
from redline.rng import preserved_rng
from redline.task import Task, task_member
from redline.tuning.memory_plan import (
    MODES,
    ONE_PROCESS,
    PROJECTION,
    SHARDINGS,
    Candidate,
    MemoryPlan,
    choose,
    enumerate_candidates,
    fits_already,
    judged_notes,
    micro_batches,
    nothing_fits,
    planned_config,
    split_timed,
)
from redline.tuning.rank_timing import Launcher, choose_on_ranks, on_ranks, train_on_ranks
from redline.tuning.recipe import DEFAULT_BATCH, kept_batch
from redline.tuning.strategy_choice import sharding_note
from redline.tuning.trial import interleave, runners

MEASURE_AT = 2  # the breakdown's micro-batch (at most the start's): small, still per-sample
ROUNDS = 3
MIN_TIMED_S = 0.3
VERIFY_STEPS = 2  # the first creates the optimizer's state; the second is the steady state
# First-step compile of torchao's low-bit step, seconds (measured on a 2-core CPU).
COMPILE_S = {"8bit": 3.0, "4bit": 12.0}

Say = Callable[[str], None]


def plan_memory(task: Task, config: RunConfig, device: DeviceInfo, *,
                modes: tuple[str, ...] = MODES, states: tuple[str, ...] | None = None,
                micro_batch: int | None = None, fits: Callable[[float], bool] | None = None,
                say: Say = lambda _: None, world_size: int = 1,
                shardings: Sequence[tuple[str | None, bool]] | None = None,
                launcher: Launcher = train_on_ranks) -> MemoryPlan:
    """The levers and micro-batch for `task` under `config.memory` (module docstring).
    `micro_batch`: fixed (only the levers are chosen), else the powers of two up to the
    effective batch kept and the start. `fits(seconds)`: whether timing may take that long.
    `world_size`: the ranks on this host planned for (the budget and the micro-batches are
    a rank's), with `shardings` the strategies considered (default: ddp and fsdp both
    ways where N > 1, memory_plan.SHARDINGS); where more than one survives the prediction,
    the leading ones are trained on the N ranks by `launcher` (rank_timing.py)."""
    t0 = time.perf_counter()
    budget = config.memory.budget_bytes or default_budget(device, world_size)[0]
    target = int(config.memory.target * budget)
    share = max(1, kept_batch(config) // world_size)  # a rank's samples of a step
    # with batch_size auto: the micro-batch the run would have had (autobatch's start)
    start = micro_batch or min(config.train.micro_batch if not config.train.auto_batch
                               else DEFAULT_BATCH, share)
    notes: list[str] = []
    say(f"memory plan: measuring the breakdown at micro-batch {min(start, MEASURE_AT)}")
    bd, step_s, modes, own_optimizer = _breakdown(task, config, device,
                                                  min(start, MEASURE_AT), modes, notes)
    bd.samples_per_step, bd.world_size = share, world_size  # a smaller one accumulates
    shardings = shardings or (SHARDINGS if world_size > 1 else ONE_PROCESS)
    if states is None:
        states, more = planned_states(own_optimizer, config.memory.optimizer_state)
        notes += more
    if world_size > 1:
        notes.append(sharding_note(bd, start))
    blocks = len(bd.blocks)
    strategy, reshard = shardings[0]
    start_peak = bd.predict(Levers(strategy=strategy, reshard_after_forward=reshard), start)
    own = replace(Levers.of(config.memory), strategy=strategy, reshard_after_forward=reshard)
    if bd.predict(own, start) <= target:
        plan = fits_already(start_peak if own.none else bd.predict(own, start), target, own,
                            start, budget, blocks, bd.to_dict())
        plan.start_peak, plan.notes, plan.world_size = start_peak, notes, world_size
        plan.wall_s, plan.sample_s = time.perf_counter() - t0, step_s / bd.micro_batch
        return plan
    sizes = [start] if micro_batch else micro_batches(share, start)
    found = enumerate_candidates(bd, target, sizes, modes, states, shardings)
    if not found.survivors:
        raise ConfigError(nothing_fits(found.rejected, target, blocks))
    measured = (choose_on_ranks(config, found, blocks, budget, world_size, fits, say, notes,
                          launcher) if world_size > 1 and on_ranks(found.survivors) else None)
    timed: list[Candidate] = []
    if measured is not None:
        chosen, why = measured
    else:
        timed = split_timed(found.survivors)
        predicted = _timing_s(timed, step_s, bd.micro_batch, kept_batch(config))
        untimed = len(timed) > 1 and fits is not None and not fits(predicted)
        if untimed:
            notes.append(f"not timed: timing {len(timed)} candidates would take about "
                         f"{predicted:.0f} s, more than the budget left (raise --budget-s)")
        chosen, why = _measure_and_choose(task, config, device, budget, timed, found.start,
                                          blocks, untimed, notes, say, world_size)
    halved = [c for c in timed if c not in found.survivors]  # added when one did not fit
    plan = MemoryPlan(chosen.levers, chosen.micro_batch, budget, target, blocks, start_peak,
                      start, why, found.survivors + halved + found.rejected, bd.to_dict(),
                      notes)
    plan.rows.sort(key=lambda r: (not r.chosen, r in found.rejected))
    plan.wall_s, plan.sample_s = time.perf_counter() - t0, step_s / bd.micro_batch
    plan.world_size = world_size
    return plan


def _breakdown(task: Task, config: RunConfig, device: DeviceInfo, size: int,
               modes: tuple[str, ...], notes: list[str]
               ) -> tuple[Breakdown, float, tuple[str, ...], bool]:
    """(the breakdown of a measuring job at `size`, a step's seconds at `size` (rough: the
    measurement's wall over its steps), the checkpointing modes the model allows, whether
    the task brings its own optimizer)."""
    t0 = time.perf_counter()
    with preserved_rng():
        job, modes = _measuring_job(task, config, device, modes, notes)
        batch = batch_tree.move(batch_tree.first_samples(job.train_set, size),
                                device.torch_device)
        with job.precision.global_context():
            bd = measure_job_breakdown(job, batch)
        own = task_member(task, "optimizer")
        own_optimizer = own is not None and own(job.model) is not None
    # two tracked steps (~2x slower) and a forward per mode: about six steps' time
    return bd, (time.perf_counter() - t0) / 6, modes, own_optimizer


def _measuring_job(task: Task, config: RunConfig, device: DeviceInfo,
                   modes: tuple[str, ...], notes: list[str]) -> tuple[Job, tuple[str, ...]]:
    """A job built for measuring: each batch whole, checkpointing installed switched off
    (the breakdown switches it), fp32 AdamW state (the others are predicted by size),
    eager on a CPU (a compiled first call under the tracker would never compile)."""
    changes: dict[str, Any] = {"train.batch_size": "auto", "memory.budget": None,
                               "memory.optimizer_state": "fp32",
                               "memory.checkpointed_blocks": None}
    if device.kind == "cpu":
        changes["precision.compile"] = False
    measuring = config.updated(changes)
    if modes != ("none",):
        try:
            return build_job(measuring.updated(
                {"memory.activation_checkpointing": "auto"}), task, device), modes
        except ConfigError as e:  # no blocks found: the state levers alone
            notes.append(f"activation checkpointing: not planned ({e})")
    return build_job(measuring.updated({"memory.activation_checkpointing": "none",
                                        "memory.checkpoint_blocks": None}), task, device), \
        ("none",)


def _timing_s(timed: list[Candidate], step_s: float, measured_at: int,
              samples_per_step: int) -> float:
    """The timing's predicted seconds: each candidate's warm-up step (and compile, for the
    low-bit states), its tracked step (~2x), the rounds. A step's seconds follow its
    samples (every micro-batch of it runs), from the breakdown's seconds per step at
    `measured_at` samples."""
    step = step_s * samples_per_step / max(1, measured_at)
    return sum(COMPILE_S.get(c.levers.optimizer_state, 0.0) + 3 * step
               + ROUNDS * (MIN_TIMED_S + step) for c in timed)


def _measure_and_choose(task: Task, config: RunConfig, device: DeviceInfo, budget: int,
                        timed: list[Candidate], start: Candidate | None, blocks: int,
                        untimed: bool, notes: list[str], say: Say, ranks: int = 1
                        ) -> tuple[Candidate, str]:
    """Time `timed` side by side (unless `untimed` or alone), pick, verify under the budget;
    on an OOM the next pick. A sharded pick is not verified: one process cannot hold a
    rank's shard alone (memory_plan.py: a projection)."""
    if any(c.levers.sharded for c in timed):
        notes.append("fsdp rows: " + PROJECTION)
    if len(timed) > 1 and not untimed:
        try:
            _time_side_by_side(task, config, device, timed, blocks, say, ranks)
        except torch.OutOfMemoryError:  # CUDA: every candidate's job at once is too much
            for c in timed:
                c.rates, c.measured_peak = [], None
            notes.append("not timed: the candidates' jobs together ran out of the device's "
                         "memory; the one with the fewest levers was taken")
        _release(device)  # the verification measures the device: nothing else on it
    # memory.target, not the budget: the headroom the user keeps is not the plan's to fill
    target = int(config.memory.target * budget)
    left = [c for c in timed if not (c.measured_peak and c.measured_peak > target)]
    for c in timed:
        if c not in left:  # its own steady-state step says it could not pass verification
            c.note = (f"does not fit: measured {format_size(c.measured_peak or 0)} > target "
                      f"{format_size(target)} (predicted {format_size(c.predicted)})")
            _halved(c, left, timed)
    while left:
        # the timed ones by their rounds; a halved one (untimed) once none of them is left
        pool = [c for c in left if c.rates] or left
        pick, why = choose(pool, start if start in pool else None, blocks)
        chosen = pool[pick]
        if chosen.levers.sharded:
            chosen.chosen, chosen.note = True, f"chosen: {why}; {PROJECTION}"
            judged_notes(pool, pick, blocks)
            return chosen, f"{why} ({PROJECTION})"
        say(f"memory plan: verifying {chosen.describe(blocks)} under the budget")
        peak = verify(task, planned_config(config, chosen.levers, chosen.micro_batch, ranks),
                      device, budget)
        if peak is not None and peak <= target:
            chosen.measured_peak = chosen.measured_peak or peak
            chosen.chosen, chosen.note = True, "chosen: " + why
            judged_notes(pool, pick, blocks)
            return chosen, why
        chosen.note = ("out of memory under the budget when verified: the next was taken"
                       if peak is None else
                       f"over memory.target when verified ({format_size(peak)} > "
                       f"{format_size(target)}): the next was taken")
        left.remove(chosen)
        _halved(chosen, left, timed)
    raise ConfigError("no candidate of the memory plan ran under the budget when verified "
                      "(every one ran out of memory); raise memory.budget or lower "
                      "memory.target")


def _halved(failed: Candidate, left: list[Candidate], rows: list[Candidate]) -> None:
    """The same levers at half the micro-batch, where `failed` did not fit its budget in a
    real step: the prediction was short, and a smaller micro-batch (the effective batch
    kept by accumulation) may still fit. Untimed; added last, so timed ones go first."""
    if failed.micro_batch == 1 or any(c.levers == failed.levers and c.micro_batch <
                                      failed.micro_batch for c in left):
        return
    smaller = Candidate(failed.levers, failed.micro_batch // 2,
                        failed.predicted * (failed.micro_batch // 2) // failed.micro_batch,
                        note="the same levers at half the micro-batch: the larger did "
                             "not fit (untimed)")
    left.append(smaller)
    rows.append(smaller)


def _time_side_by_side(task: Task, config: RunConfig, device: DeviceInfo,
                       timed: list[Candidate], blocks: int, say: Say, ranks: int = 1) -> None:
    """Each candidate's rates (interleaved rounds) and measured steady-state peak (not a
    sharded one's: one process holds the whole model)."""
    configs = [planned_config(config, c.levers, c.micro_batch, ranks) for c in timed]
    with runners(task, configs, device) as built:
        for c, runner in zip(timed, built, strict=True):
            say(f"memory plan: warming up {c.describe(blocks)}")
            runner.warm_up()
            peak = steady_peak(runner.job, runner.step)
            c.measured_peak = None if c.levers.sharded else peak
        timings = interleave(built, ROUNDS, MIN_TIMED_S, lambda i, r: say(
            f"memory plan: timing {timed[i].describe(blocks)} (round {r + 1} of {ROUNDS})"))
    for c, timing in zip(timed, timings, strict=True):
        c.rates = list(timing.rates)


def _release(device: DeviceInfo) -> None:
    """The timing's jobs freed (CUDA: their blocks back from the caching allocator)."""
    gc.collect()
    if device.is_cuda:
        torch.cuda.empty_cache()


def steady_peak(job: Job, step: Callable[[], Any]) -> int:
    """The peak of one more `step()` of a job already stepped (its optimizer's state
    present): tracked on a CPU (unbudgeted), the allocator's on CUDA, where what else the
    device holds (the other candidates' jobs) is taken out."""
    job.optimizer.zero_grad(set_to_none=True)  # freed inside the step: not in the baseline
    baseline = live_tensor_bytes(job.model, job.optimizer)
    with preserved_rng():
        stats = measure_peak(step, job.device, baseline=baseline)
    return stats.peak_bytes - stats.baseline_bytes + baseline


def verify(task: Task, config: RunConfig, device: DeviceInfo, budget: int) -> int | None:
    """The peak of VERIFY_STEPS real steps of `config` under `budget` (no OOM guard, so an
    OOM is seen; at most two micro-batches a step: module docstring), or None where they
    ran out of memory."""
    t = config.train
    steps = min(t.samples_per_step, 2 * t.micro_batch)
    with preserved_rng():
        job = build_job(config.updated({"memory.budget": None, "memory.oom_guard": False,
                                        "train.effective_batch_size": steps}), task, device)
        runner = JobRunner(job)
        baseline = live_tensor_bytes(job.model, job.optimizer)
        try:
            with runner.context(), MemoryBudget(budget, device, baseline=baseline):
                stats = measure_peak(lambda: [float(runner.next_step().item())
                                              for _ in range(VERIFY_STEPS)],
                                     device, baseline=baseline)
        except torch.OutOfMemoryError:
            return None
    return stats.peak_bytes


def resolve_auto_levers(task: Task, config: RunConfig, device: DeviceInfo,
                        saved: dict[str, Any] | None = None, main: bool = True,
                        say: Say = lambda _: None, world_size: int = 1
                        ) -> tuple[RunConfig, dict[str, Any]]:
    """memory.activation_checkpointing auto with a fixed batch size -> the config with the
    checkpointing the plan chose at that micro-batch (none where it fits), and what to record.
    `saved`: a resumed run's memory section (its config.yaml), reused as chosen then.
    `world_size`: the run's ranks, each predicted under the run's (resolved) strategy."""
    if saved is not None:
        levers = Levers(saved.get("activation_checkpointing", "none"),
                        saved.get("checkpointed_blocks"), config.memory.optimizer_state)
        if main:
            print(f"activation_checkpointing: auto: {levers.describe()} (from the run's "
                  "config.yaml)", file=sys.stderr, flush=True)
        return config.updated(levers.updates()), {"source": "config.yaml",
                                                  "levers": levers.updates()}
    dist = config.distributed
    plan = plan_memory(task, config, device, micro_batch=config.train.micro_batch,
                       states=(config.memory.optimizer_state,), say=say,
                       world_size=world_size,
                       shardings=((dist.strategy, dist.reshard_after_forward),)
                       if world_size > 1 else None)
    if main:
        print(f"activation_checkpointing: auto: {plan.summary()}", file=sys.stderr,
              flush=True)
    chosen = Levers(plan.levers.checkpointing, plan.levers.checkpointed_blocks,
                    config.memory.optimizer_state)
    return config.updated(chosen.updates()), plan.to_dict()
