"""`redline tune` end to end, around the search itself (tune.py).

    options     --factors, --budget-s, --quality-steps checked (TuneOptions.from_flags)
    which one   the full search (tune.py), or the batch search only (autobatch.py) when
                --batch-only asks or under torchrun, where every rank searches its own
                device and the ranks agree on one micro-batch (alone, where not even one
                sample fits, the memory plan's levers first, as batch_size: auto does)
    budget      --budget-s counts from the command's start (process_age_s: its imports and
                the task's construction are part of what the user waits for)
    cache       the batch search's cache, or a scratch directory with --no-cache
    written     rank 0 writes the tuned config (write_tuned): memory.budget left out
                unless --keep-budget, a task file's path made absolute

The CLI parses the flags, calls `run_tune` and prints what it returns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redline import distributed
from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.files import atomic_write_text
from redline.job.build import rank_device
from redline.task import Task
from redline.telemetry.progress import status
from redline.tuning.autobatch import (
    AutobatchResult,
    DoesNotFit,
    autobatch_ranks,
    with_planned_levers,
)
from redline.tuning.tune import DEFAULT_BUDGET_S, FACTORS, TuneReport, tune
from redline.tuning.tune_report import process_age_s

TORCHRUN_NOTICE = ("redline tune under torchrun searches the micro-batch only; run it in one "
                   "process for precision, data loading and compile")


def parse_factors(text: str | None) -> tuple[str, ...]:
    """--factors as a tuple of FACTORS' names (all of them when not given)."""
    if not text:
        return FACTORS
    names = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in names if f not in FACTORS]
    if unknown or not names:
        raise ConfigError(f"--factors {text!r}: unknown factor {', '.join(unknown) or '(none)'}"
                          f"; choose from {', '.join(FACTORS)}")
    return names


@dataclass(frozen=True)
class TuneOptions:
    """What `redline tune` was asked beyond the config: the search's bounds and the output."""

    factors: tuple[str, ...] = FACTORS
    budget_s: float = DEFAULT_BUDGET_S
    quality_steps: int | None = None
    batch_only: bool = False
    cached: bool = True  # False: search even if a result is cached (--no-cache)
    output: str | None = None  # default: TASK-tuned.yaml
    keep_budget: bool = False
    nproc: int = 1  # the ranks on this host the memory plan plans for (--nproc)

    @classmethod
    def from_flags(cls, *, factors: str | None, budget_s: float | None,
                   quality_steps: int | None, batch_only: bool, no_cache: bool,
                   output: str | None, keep_budget: bool, nproc: int | None = None
                   ) -> TuneOptions:
        """The options the flags give; ConfigError (one sentence) for a value out of range."""
        chosen = parse_factors(factors)
        if budget_s is not None and budget_s <= 0:
            raise ConfigError(f"--budget-s {budget_s:g}: give a positive number of seconds")
        if quality_steps is not None and quality_steps < 2:
            raise ConfigError(f"--quality-steps {quality_steps}: give at least 2 steps")
        if nproc is not None and nproc < 1:
            raise ConfigError(f"--nproc {nproc}: give the number of ranks to plan for, >= 1")
        return cls(chosen, budget_s or DEFAULT_BUDGET_S, quality_steps, batch_only,
                   not no_cache, output, keep_budget, nproc or 1)


@dataclass(frozen=True)
class Tuned:
    """What `redline tune` did. On ranks other than 0 (under torchrun) `path` is None: rank
    0 writes the config and reports. Exactly one of `report` and `batch` is set."""

    path: Path | None
    budget_dropped: bool
    report: TuneReport | None = None  # the full search
    batch: AutobatchResult | None = None  # the batch search only
    ranks: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The search's result, as --json prints it, with the written config's path."""
        result = self.report if self.report is not None else self.batch
        assert result is not None, "a tune result holds the full search's or the batch's"
        return {**result.to_dict(), "config": str(self.path)}


def write_tuned(config: RunConfig, task_name: str, output: str | None = None,
                keep_budget: bool = False) -> tuple[Path, bool]:
    """Write the tuned config to `output` (default TASK-tuned.yaml): without memory.budget
    unless `keep_budget`, with a task file's path made absolute. (the path, whether the
    budget was dropped)."""
    dropped = config.memory.budget is not None and not keep_budget
    if dropped:  # the search needed it; training with it on a CPU is tracked, slower
        config = config.updated({"memory.budget": None})
    module, sep, attr = (config.task or "").rpartition(":")
    if sep and module.endswith(".py"):  # the tuned config works from any directory
        config = config.updated({"task": f"{Path(module).resolve()}:{attr}"})
    out = Path(output or f"{task_name}-tuned.yaml")
    atomic_write_text(out, config.to_yaml(), "tuned config")
    return out, dropped


def run_tune(task: Task, config: RunConfig, options: TuneOptions,
             warn: Callable[[str], None] = lambda _: None) -> Tuned:
    """Search `task`'s fastest settings from `config` and write the tuned config (module
    docstring); `warn` hears what the user should know before the search starts."""
    world = distributed.World.from_env()  # under torchrun every rank searches its device
    device = rank_device(config.device, world)
    with tempfile.TemporaryDirectory() as scratch:
        cache = None if options.cached else scratch
        if options.batch_only or world.distributed:
            if world.distributed and not options.batch_only and world.main:
                warn(TORCHRUN_NOTICE)
            return _batch_only(task, config, options, world, device, cache)
        with status("tune") as shown:
            tuned, report = tune(task, config, device, cache_dir=cache,
                                 factors=options.factors, budget_s=options.budget_s,
                                 quality_steps=options.quality_steps, say=shown,
                                 spent_s=process_age_s(), world_size=options.nproc)
    path, dropped = write_tuned(tuned, task.name, options.output, options.keep_budget)
    return Tuned(path, dropped, report=report)


def _batch_only(task: Task, config: RunConfig, options: TuneOptions,
                world: distributed.World, device: DeviceInfo, cache: str | None) -> Tuned:
    comm = distributed.init(world, device.kind)
    with status("tune") as shown:
        try:
            result = autobatch_ranks(task, config, device, comm, cache_dir=cache,
                                     progress=shown if world.main else None)
        except DoesNotFit as e:  # one process: the memory levers first, then the search
            if world.distributed:
                raise
            config, _ = with_planned_levers(task, config, device, str(e), shown)
            result = autobatch_ranks(task, config, device, comm, cache_dir=cache,
                                     progress=shown)
    if not world.main:  # rank 0 writes the tuned config
        return Tuned(None, False, batch=result, ranks=world.size)
    path, dropped = write_tuned(result.apply(config), task.name, options.output,
                                options.keep_budget)
    return Tuned(path, dropped, batch=result, ranks=world.size)
