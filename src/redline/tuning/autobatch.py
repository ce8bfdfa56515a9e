"""The batch search (autobatch): the largest micro-batch that fits a memory target, and
the fastest one. A workflow: its trials are built through build.py, like training, and
what they measure (the memory fit, the throughput knee) is batchsearch.py's.

The effective batch (samples per optimizer step) is kept with gradient accumulation:
`train.effective_batch_size`, else the batch the run would have had without `auto` (16,
the default `batch_size`); the search picks the micro-batch under it. Only with
`train.grow_effective_batch` may it grow to the micro-batch chosen, the learning rate then
following `train.lr_scaling` (recipe.py), printed old -> new.

The start is the micro-batch the run would have had without `auto` (16, at most the
effective batch): it is timed in the same interleaved rounds as every other size and kept
unless one is faster beyond the rounds' noise (knee.py). The line printed says what was
kept and why, and `samples_per_s_table` in the result (and in `--json`) holds the table.

The budget is `memory.budget`, or the device's memory; on a CPU without a budget, a
share of the memory available when the search starts (memory/probe.py says why).

Under torchrun every rank searches on its own device (each trial is one process's step,
with the host's memory split between the ranks on it), and the ranks settle on the
smallest micro-batch any of them chose (one message): the size every rank can hold.

Results are cached on disk under the job's fingerprint (build.Job.fingerprint: model
structure and dtypes, precision, compile, optimizer, input shapes, device and its memory,
torch version) and the budget and target: a cache hit costs one verification step.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from redline.checkpoint import list_checkpoints
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.distributed import Comm, World
from redline.errors import StorageError
from redline.files import atomic_write_text
from redline.judge import timing_noise
from redline.memory.probe import default_budget
from redline.rng import preserved_rng
from redline.task import Task
from redline.telemetry.progress import status
from redline.tuning.batchsearch import (
    KNEE_TOLERANCE,
    AutobatchResult,
    DoesNotFit,
    Harness,
    Progress,
    SizeTrial,
    choose_knee,
    search_fastest,
    search_largest,
    train_and_eval,
)
from redline.tuning.memory_plan_run import plan_memory
from redline.tuning.recipe import DEFAULT_BATCH, kept_batch, recipe

__all__ = ["KNEE_TOLERANCE", "AutobatchResult", "DoesNotFit", "SizeTrial", "autobatch",
           "autobatch_ranks", "choose_knee", "resolve_auto_batch", "start_micro_batch",
           "timing_noise", "with_planned_levers"]


def autobatch(task: Task, config: RunConfig, device: DeviceInfo, *,
              cache_dir: str | Path | None = None, measure_throughput: bool = True,
              progress: Progress | None = None, sharing: int = 1,
              verify_largest: bool = True, timing_s: float | None = None,
              deadline: float | None = None, start: int | None = None) -> AutobatchResult:
    """Find the micro-batch to train `task` with under `config.memory` (see module doc);
    `sharing`: processes training on this host (torchrun's ranks on one machine).
    `verify_largest=False` (redline tune): the largest size is predicted from two small
    probes, not verified, and only the sizes the scan reaches are checked against the
    budget, then the chosen one with its evaluation batch (batchsearch.py). `timing_s`:
    each size's timing (default 20 ms); `deadline`: a perf_counter time after which the
    scan times no larger size. `start`: the micro-batch to keep unless beaten beyond the
    noise (default: start_micro_batch(config))."""
    start = start or start_micro_batch(config)
    say = progress or (lambda _: None)
    if config.memory.budget_bytes is not None:
        budget, source = config.memory.budget_bytes, "memory.budget"
    else:
        budget, source = default_budget(device, sharing)
        say(f"no memory.budget: searching within {source}")
    target = int(config.memory.target * budget)
    with preserved_rng():  # tuning must not shift training's random streams
        h = Harness(task, config, device)
        if timing_s is not None:  # redline tune times longer: its choice is end to end
            h.timing_s = timing_s
        h.deadline = deadline  # redline tune's budget: the scan stops at the next size
        fingerprint = h.job.fingerprint(
            f"budget={budget}", f"target={config.memory.target}",
            f"verify_largest={verify_largest}", f"start={start}",
            f"grow={config.train.grow_effective_batch}", f"kept={kept_batch(config)}")
        cached = _load_cache(cache_dir, fingerprint)
        if cached is not None:
            say(f"cache hit: micro-batch {cached.chosen}; verifying")
            ok, _ = h.fits(lambda: train_and_eval(h, cached.chosen, cached.eval_batch_size),
                           budget, target)
            if ok:
                cached.cache_hit, cached.verify_steps = True, 1
                cached.probe_steps = cached.throughput_steps = 0
                return _with_recipe(cached, config)  # the measurement; this config's recipe
            say("cached size no longer fits; searching again")
        search = search_largest if verify_largest or not measure_throughput else search_fastest
        result = search(h, config, budget, target, measure_throughput, say, start)
    result.fingerprint, result.budget_source = fingerprint, source
    _save_cache(cache_dir, result)
    return _with_recipe(result, config)


def start_micro_batch(config: RunConfig) -> int:
    """The micro-batch the run would have had without `batch_size: auto`: the default batch
    size (16), at most the effective batch kept."""
    return min(DEFAULT_BATCH, kept_batch(config))


def _with_recipe(result: AutobatchResult, config: RunConfig, ranks: int = 1
                 ) -> AutobatchResult:
    """The result with the effective batch, accumulation and lr `config` implies (recipe.py):
    a cached search holds what was measured, never the lr of the run that measured it."""
    r = recipe(config, result.chosen, result.eval_batch_size, ranks, result.start)
    result.chosen, result.accumulation_steps = r.micro_batch, r.accumulation_steps
    result.effective_batch_size, result.lr = r.effective_batch_size, r.lr
    result.ranks = ranks
    return result


def resolve_auto_batch(task: Task, config: RunConfig, device: DeviceInfo, run_dir: Path,
                       resume: bool, interactive: bool | None,
                       check: Callable[[], None] = lambda: None, comm: Comm | None = None
                       ) -> tuple[RunConfig, dict[str, Any]]:
    """batch_size: auto -> the config with the tuned micro-batch, effective batch, lr and
    eval batch, and what to record of the decision. `check()` runs before each trial (it
    may raise, e.g. signals.Interrupted on SIGTERM). `comm`: the ranks, which settle on
    the smallest micro-batch any chose (module docstring).

    Where not even one sample fits memory.target (one process), the memory plan chooses
    the memory levers (memory_plan_run.py; printed, recorded under "memory_plan") and the
    search runs again with them; `memory.activation_checkpointing: auto` is resolved here
    too (none where the search fits without it).

    A resumed run reuses the values its first start chose (they are in its config.yaml:
    the micro-batch, the evaluation batch and the levers), so the math of the steps
    already taken does not change.
    """
    world = comm.world if comm is not None else World()
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and list_checkpoints(run_dir / "checkpoints"):
        # What the first start measured (micro-batch, eval batch, levers); the rest follows
        # this config, and the checkpoint's config is compared with the result like any
        # resume.
        first = yaml.safe_load(saved.read_text())
        old = first["train"]
        config = config.updated(saved_levers(first.get("memory") or {}, config))
        plan = recipe(config, old["batch_size"], old["eval_batch_size"], world.size)
        if world.main:
            print(f"batch_size: auto: {plan.describe(config)} (from {saved})",
                  file=sys.stderr, flush=True)
        return plan.apply(config), {"source": str(saved), "micro_batch": plan.micro_batch}
    planned: dict[str, Any] = {}
    with status("autobatch", interactive=interactive) as shown:
        say = shown if world.main else (lambda msg: None)  # rank 0 shows its search
        try:
            r = autobatch_ranks(task, config, device, comm,
                                progress=lambda msg: (check(), say(msg)))
        except DoesNotFit as e:
            if world.distributed:
                raise
            config, planned = with_planned_levers(task, config, device, str(e), say)
            r = autobatch_ranks(task, config, device, comm,
                                progress=lambda msg: (check(), say(msg)))
    if config.memory.activation_checkpointing == "auto":  # fits without: none, recorded
        config = config.updated({"memory.activation_checkpointing": "none"})
    if world.main:
        why = f" ({r.why}; samples/s: {_speeds(r)})" if r.why else ""
        print(f"batch_size: auto: {r.recipe.describe(config)}{why}", file=sys.stderr,
              flush=True)
    return r.apply(config), {
        "micro_batch": r.chosen, "max_fit": r.max_fit,
        "accumulation_steps": r.accumulation_steps,
        "effective_batch_size": r.effective_batch_size, "lr": r.lr,
        "eval_batch_size": r.eval_batch_size, "cache_hit": r.cache_hit,
        "probe_steps": r.probe_steps, "verify_steps": r.verify_steps,
        "budget_bytes": r.budget_bytes, "budget_source": r.budget_source,
        "start": r.start, "why": r.why, "samples_per_s_table": r.table(),
        **({"memory_plan": planned} if planned else {})}


def saved_levers(memory: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The levers a run's first start trained with (its config.yaml's memory section), as
    RunConfig.updated keys; the config's own where the file has none."""
    keys = ("activation_checkpointing", "checkpointed_blocks", "optimizer_state")
    return {f"memory.{k}": memory.get(k, getattr(config.memory, k)) for k in keys}


def with_planned_levers(task: Task, config: RunConfig, device: DeviceInfo, why: str,
                 say: Callable[[str], None]) -> tuple[RunConfig, dict[str, Any]]:
    """`config` with the levers the memory plan chose (not even one sample fit without:
    `why`), printed; and the plan, for the run's events."""
    say(f"{why}: planning the memory levers")
    plan = plan_memory(task, config, device, say=say)
    print(f"memory plan: {plan.summary()}", file=sys.stderr, flush=True)
    return plan.apply(config), plan.to_dict()


def _speeds(r: AutobatchResult) -> str:
    """The samples/s table in one line: each size's median (start and choice marked)."""
    return ", ".join(f"{row['micro_batch']}{' (start)' if row['start'] else ''}"
                     f"{' (chosen)' if row['chosen'] else ''} {row['samples_per_s']:.1f}"
                     for row in r.table())


def autobatch_ranks(task: Task, config: RunConfig, device: DeviceInfo, comm: Comm | None,
                    **options: Any) -> AutobatchResult:
    """`autobatch` on every rank (each on its own device, sharing the host's memory), then
    the size every rank holds: the smallest chosen, in one message (module docstring)."""
    world = comm.world if comm is not None else World()
    r = autobatch(task, config, device, sharing=world.local_size, **options)
    if comm is None or not world.distributed:
        return r
    micro, evaluation = comm.agree(-r.chosen, -(r.eval_batch_size or 0))  # max of negatives
    r.chosen, r.eval_batch_size = -micro, -evaluation or None
    return _with_recipe(r, config, world.size)


def default_cache_dir() -> Path:
    return Path(os.environ.get("REDLINE_CACHE_DIR",
                               Path.home() / ".cache" / "redline")) / "autobatch"


def _cache_path(cache_dir: str | Path | None, fingerprint: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{fingerprint}.json"


def _load_cache(cache_dir: str | Path | None, fingerprint: str) -> AutobatchResult | None:
    path = _cache_path(cache_dir, fingerprint)
    try:
        return AutobatchResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or unreadable: search afresh


def _save_cache(cache_dir: str | Path | None, result: AutobatchResult) -> None:
    path = _cache_path(cache_dir, result.fingerprint)
    # a read-only home must not stop training (the next run searches again); a temporary
    # file per process, so ranks may write it at once
    with contextlib.suppress(StorageError, OSError):
        atomic_write_text(path, json.dumps(result.to_dict()), "batch-search cache")
