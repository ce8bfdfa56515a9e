"""`distributed.strategy: auto`: DDP where the whole model fits one rank, FSDP where not.

DDP is the faster of the two wherever it fits (one all-reduce of the gradients a step,
against FSDP's all-gather of every block's parameters, forward and backward, and a
reduce-scatter), so auto shards only when it must: when one rank's predicted steady-state
peak with the whole model (its parameters, gradients and optimizer state at
memory.optimizer_state, plus the activations and temporaries of the rank's micro-batch,
with the configured checkpointing) is over `memory.target` of the budget. The budget is
per rank: memory.budget, else the device's memory (on a CPU, the default share of the
memory available, split between the host's ranks: memory/probe.py default_budget).

The peak comes from the memory breakdown (job/memory.py): one tracked single-process step
at the rank's micro-batch on a job built for measuring (unbudgeted: the tracker measures,
it does not enforce), from which the sharded peak over the N ranks is predicted as well
(memory/breakdown.py), so the sentence says what sharding would hold. Under torchrun the
measurement runs on rank 0 only, and its answer goes to every rank (Comm.from_main): all
ranks must build the same model. With batch_size auto the micro-batch is not known yet,
so the choice is for one sample a rank (states first: the batch search fills what is left).

A single process has nothing to shard: auto is ddp, trivially, and no step is measured.
A resumed run takes the strategy its first start chose at the same world size (its
config.yaml), so the checkpoint's layout does not change under it.

`sharding_note` says, for the memory plan over N ranks, what sharding saves of a rank's
peak, and when little because activations dominate (sharding divides none of them).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from redline.checkpoint import list_checkpoints
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.distributed import Comm, World
from redline.job.memory import measure_config_breakdown
from redline.memory.breakdown import Breakdown
from redline.memory.levers import Levers
from redline.memory.probe import default_budget, format_size
from redline.rng import preserved_rng
from redline.task import Task


@dataclass
class StrategyChoice:
    """What auto chose for `world_size` ranks, and the numbers it chose from (bytes)."""

    strategy: str
    why: str
    world_size: int
    micro_batch: int = 0
    budget: int | None = None
    target: int | None = None
    states: int = 0  # the whole model's parameters, gradients and optimizer state
    ddp_peak: int | None = None  # one rank's predicted peak holding the whole model
    fsdp_peak: int | None = None  # one rank's predicted peak, sharded over world_size
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_strategy(task: Task, config: RunConfig, device: DeviceInfo,
                    world: World) -> StrategyChoice:
    """ddp or fsdp for `config` on `world.size` ranks (module docstring), with why."""
    if not world.distributed:
        return StrategyChoice("ddp", "one process: nothing to shard", 1)
    t = config.train
    micro = 1 if t.auto_batch else min(t.micro_batch, max(1, t.samples_per_step // world.size))
    budget = config.memory.budget_bytes or default_budget(device, world.local_size)[0]
    target = int(config.memory.target * budget)
    measuring = config.updated({"distributed.strategy": "ddp"})
    if measuring.memory.activation_checkpointing == "auto":  # the plan's to decide later
        measuring = measuring.updated({"memory.activation_checkpointing": "none"})
    with preserved_rng():
        bd = measure_config_breakdown(measuring, task, device, micro)
    bd.world_size = world.size
    return decide(bd, Levers.of(config.memory), micro, budget, target,
                  config.distributed.reshard_after_forward)


def decide(bd: Breakdown, levers: Levers, micro_batch: int, budget: int, target: int,
           reshard_after_forward: bool = True) -> StrategyChoice:
    """The choice from a breakdown predicted for `bd.world_size` ranks: ddp where the whole
    model's peak at `micro_batch` with `levers` is within `target`, else fsdp."""
    ddp = Levers(levers.checkpointing, levers.checkpointed_blocks, levers.optimizer_state,
                 "ddp")
    fsdp = Levers(levers.checkpointing, levers.checkpointed_blocks, levers.optimizer_state,
                  "fsdp", reshard_after_forward)
    states, n = bd.states(ddp), bd.world_size
    ddp_peak, fsdp_peak = bd.predict(ddp, micro_batch), bd.predict(fsdp, micro_batch)
    one = (f"the model's states ({format_size(states)}) with micro-batch {micro_batch} "
           f"come to {format_size(ddp_peak)} on one rank")
    of = f"memory.target of the {format_size(budget)} budget per rank, {format_size(target)}"
    if ddp_peak <= target:
        strategy, why = "ddp", f"{one}, within {of} (sharded over {n} ranks: " \
            f"{format_size(fsdp_peak)})"
    else:
        short = "" if fsdp_peak <= target else "; even sharded it is over the target " \
            "(activation checkpointing or a smaller micro-batch would help)"
        strategy, why = "fsdp", (f"{one}, over {of}; sharded over {n} ranks a rank holds "
                                 f"~{format_size(fsdp_peak)}{short}")
    return StrategyChoice(strategy, why, n, micro_batch, budget, target, states, ddp_peak,
                          fsdp_peak, bd.source)


def resolve_auto_strategy(task: Task, config: RunConfig, device: DeviceInfo, comm: Comm,
                          run_dir: Path | None = None, resume: bool = False
                          ) -> tuple[RunConfig, dict[str, Any] | None]:
    """`config` with distributed.strategy auto resolved (module docstring), and what to
    record of it (None: not auto). Said on rank 0's stderr in one line."""
    if config.distributed.strategy != "auto":
        return config, None
    world = comm.world
    saved = _first_strategy(run_dir, world.size) if resume and run_dir is not None else None
    if saved is not None:
        choice = StrategyChoice(saved, "the run's first start chose it (config.yaml)",
                                world.size, source="config.yaml")
    else:
        choice = comm.from_main(lambda: choose_strategy(task, config, device, world))
    if world.main:
        print(f"distributed.strategy auto: {choice.strategy} — {choice.why}",
              file=sys.stderr, flush=True)
    return config.updated({"distributed.strategy": choice.strategy}), choice.to_dict()


def _first_strategy(run_dir: Path, world_size: int) -> str | None:
    """The strategy a resumed run's first start resolved auto to, where it ran on as many
    ranks and left a checkpoint; else None (chosen afresh)."""
    saved, env = run_dir / "config.yaml", run_dir / "environment.json"
    if not (saved.is_file() and list_checkpoints(run_dir / "checkpoints")):
        return None
    try:
        run = json.loads(env.read_text()).get("run", {}) if env.is_file() else {}
        ranks = int(run.get("ranks", 1))
    except (ValueError, OSError):
        return None
    strategy = (yaml.safe_load(saved.read_text()).get("distributed") or {}).get("strategy")
    return strategy if ranks == world_size and strategy in ("ddp", "fsdp") else None


def sharding_note(bd: Any, micro_batch: int) -> str:
    """What sharding saves of one rank's peak without other levers at `micro_batch`, for
    `bd` (a Breakdown predicting for bd.world_size ranks); where little because activations
    dominate, says so, and whether full activation checkpointing would save more."""
    ddp, fsdp = Levers(strategy="ddp"), Levers(strategy="fsdp")
    whole, sharded = bd.predict(ddp, micro_batch), bd.predict(fsdp, micro_batch)
    saves = 1 - sharded / max(1, whole)
    acts = bd.activations(ddp, micro_batch) / max(1, whole)
    words = (f"sharding over {bd.world_size} ranks: a rank's predicted peak at micro-batch "
             f"{micro_batch} is {format_size(whole)} under ddp, {format_size(sharded)} under "
             f"fsdp ({saves:.0%} less)")
    if saves >= 0.25 or acts < 0.5:
        return words
    words += (f"; sharding saves {saves:.0%} of the peak: activations are {acts:.0%} of it")
    if bd.blocks:
        full = bd.predict(Levers("full", None, "fp32", "ddp"), micro_batch)
        if whole - full > whole - sharded:
            words += (f"; activation checkpointing saves more (full: "
                      f"{format_size(full)}, {1 - full / max(1, whole):.0%} less)")
    return words
