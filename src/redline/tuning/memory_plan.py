"""The memory plan's decision: which levers, at which micro-batch, from predictions and timings.

A model that does not fit its budget at the micro-batch it would train with needs memory
levers (activation checkpointing, low-bit optimizer states: memory/levers.py), and each
costs speed. The plan decides from two kinds of evidence, kept apart so the decision is
tested with injected numbers (memory_plan_run.py measures them):

  1. predicted peaks: the memory breakdown (memory/breakdown.py) predicts every
     combination's steady-state peak at every micro-batch. A combination is checkpointing
     {none, selective, full} (on the fewest first blocks that fit: `fewest_blocks`) x
     optimizer state {fp32, bf16, 8bit, 4bit, as available} x micro-batch (the powers of
     two up to the effective batch kept, and the start). Those over `memory.target` of the
     budget are dropped; per lever set the largest fitting micro-batch is kept (more
     samples per micro-step, fewer accumulation steps); a candidate is dropped when one
     with no more of any lever runs at the same or a larger micro-batch (more levers at no
     more samples per step is only slower). At most TIMED candidates go on, those with
     the fewest levers first; the rest say why they were not timed.
  2. measured speed: the survivors' samples/s, timed side by side in interleaved rounds
     (trial.py). Where the step fits without levers at some micro-batch, that is the
     start, and a lever is adopted only when measured faster beyond the noise
     (judge.faster_than_start: the memory it frees buys a larger micro-batch that is
     faster); where nothing fits without levers, the fastest fitting candidate is chosen,
     a tie going to fewer levers (judge.first_as_fast).

Planned for N ranks (`redline tune --nproc N`), the strategy is a lever too: ddp, and fsdp
with reshard_after_forward true or false, each predicted per rank (memory/breakdown.py:
a sharded rank holds 1/N of the states and the gathered blocks), the micro-batches a
rank's share of the effective batch. ddp comes first in the preference order (a tie goes
to it, then to fewer levers). One process cannot time communication, so where more than
one strategy survives, the leading survivors train for real on the N ranks and the choice
goes by those rates (rank_timing.py; a row's `ranks`). Where the budget leaves no time for
that, a sharded candidate is timed as one process's compute (its communication not
included) and its row says so: the choice is a projection, and its per-rank peak a
prediction (not verified: one process cannot hold a rank's shard alone). Where sharding
saves little because activations dominate, the notes say so.

Where the start's micro-batch fits without levers already, there is nothing to decide: the
plan is "no lever", at the cost of the breakdown alone. A `MemoryPlan` holds the choice,
every candidate as a row (combination, predicted and measured peak, samples/s and the
rounds' spread, why chosen or rejected) and renders the table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from redline.config import RunConfig
from redline.judge import faster_than_start, first_as_fast, relative_range
from redline.memory.levers import Levers
from redline.memory.sizes import format_size
from redline.tuning.recipe import kept_batch, recipe

MODES = ("none", "selective", "full")
TIMED = 6  # candidates timed at most: each costs a warm-up (torchao compiles) and rounds
# How much of a lever each setting is: a candidate with no more of any is "fewer levers".
MODE_RANK = {"none": 0, "selective": 1, "full": 2}
STATE_RANK = {"fp32": 0, "bf16": 1, "8bit": 2, "4bit": 3, "cpu-offload": 4}
# (strategy, reshard_after_forward): one process plans none; N ranks plan these three
ONE_PROCESS: tuple[tuple[str | None, bool], ...] = ((None, True),)
SHARDINGS: tuple[tuple[str | None, bool], ...] = (("ddp", True), ("fsdp", False),
                                                  ("fsdp", True))
# optimizer states a fsdp run refuses (job/build.py: torchao's 4-bit step rejects local
# shards): never a candidate, or its launch on N ranks fails
NOT_SHARDED = ("4bit",)
PROJECTION = ("a projection: FSDP's time is one process's compute (its communication not "
              "included), its peak predicted per rank")


def shard_rank(levers: Levers) -> int:
    """How much sharding: 0 none or ddp, 1 fsdp keeping the gathered blocks, 2 fsdp."""
    return 0 if not levers.sharded else (2 if levers.reshard_after_forward else 1)


class Predictor(Protocol):
    """What the plan needs of a memory breakdown (memory/breakdown.py's Breakdown)."""

    blocks: Sequence[Any]
    micro_batch: int  # the micro-batch it was measured at

    def predict(self, levers: Levers, micro_batch: int) -> int: ...

    def fewest_blocks(self, levers: Levers, micro_batch: int, limit: int) -> int | None: ...


@dataclass
class Candidate:
    """One combination of levers at one micro-batch: a row of the plan's table."""

    levers: Levers
    micro_batch: int
    predicted: int  # bytes, the breakdown's prediction of the steady-state peak
    measured_peak: int | None = None  # bytes, a tracked steady-state step (timed ones)
    rates: list[float] = field(default_factory=list)  # samples/s, one per round
    note: str = ""  # why chosen or rejected
    chosen: bool = False
    ranks: int = 0  # N: `rates` are N ranks' training (rank_timing.py); 0: one process's

    @property
    def samples_per_s(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def spread(self) -> float | None:
        return relative_range(self.rates) if len(self.rates) >= 2 else None

    def describe(self, blocks: int) -> str:
        return f"{self.levers.describe(blocks)} at micro-batch {self.micro_batch}"

    def to_dict(self, blocks: int) -> dict[str, Any]:
        return {"levers": asdict(self.levers), "combination": self.levers.describe(blocks),
                "micro_batch": self.micro_batch, "predicted_peak": self.predicted,
                "measured_peak": self.measured_peak, "samples_per_s": self.samples_per_s,
                "spread": self.spread, "rounds": list(self.rates), "note": self.note,
                "chosen": self.chosen, "timed_on_ranks": self.ranks}


def lever_key(levers: Levers, blocks: int) -> tuple[int, int, int, int]:
    """(checkpointing mode, blocks checkpointed, optimizer state, sharding): how much of
    each lever."""
    count = 0 if levers.checkpointing == "none" else (
        blocks if levers.checkpointed_blocks is None else min(levers.checkpointed_blocks,
                                                               blocks))
    mode = MODE_RANK[levers.checkpointing] if count else 0
    return mode, count, STATE_RANK[levers.optimizer_state], shard_rank(levers)


def preference(c: Candidate, blocks: int) -> tuple[int, ...]:
    """Sort key, most preferred first: unsharded, fewer levers on, less of them, larger
    micro-batch."""
    mode, count, state, shard = lever_key(c.levers, blocks)
    return (shard, bool(mode) + bool(state), mode + state, count, state, -c.micro_batch)


def no_more_levers(a: Levers, b: Levers, blocks: int) -> bool:
    """Whether `a` uses no more of any lever than `b`."""
    return all(x <= y for x, y in zip(lever_key(a, blocks), lever_key(b, blocks),
                                      strict=True))


@dataclass
class Candidates:
    """The enumeration's outcome: the fitting survivors (preference order) and the rest."""

    survivors: list[Candidate]
    rejected: list[Candidate]
    start: Candidate | None  # the no-lever candidate where it fits at some micro-batch


def micro_batches(cap: int, start: int) -> list[int]:
    """The micro-batches a plan considers: powers of two up to `cap`, and the start."""
    return sorted({1 << i for i in range(cap.bit_length()) if 1 << i <= cap}
                  | ({start} if start <= cap else set()))


def enumerate_candidates(bd: Predictor, target: int, sizes: Sequence[int],
                         modes: Sequence[str] = MODES, states: Sequence[str] = ("fp32",),
                         shardings: Sequence[tuple[str | None, bool]] = ONE_PROCESS
                         ) -> Candidates:
    """Every lever set's largest fitting micro-batch among `sizes`, dominated ones dropped
    (module docstring). `shardings`: the (strategy, reshard_after_forward) pairs."""
    blocks = len(bd.blocks)
    fitting: list[Candidate] = []
    rejected: list[Candidate] = []
    for base in (Levers("none", None, state, strategy, reshard)
                 for strategy, reshard in shardings for state in states
                 if not (strategy == "fsdp" and state in NOT_SHARDED)):
        for mode in modes if blocks else ("none",):
            found = _largest_fitting(bd, target, sizes, mode, base, blocks)
            if isinstance(found, Candidate):
                fitting.append(found)
            elif found is not None:
                rejected.append(found[1])
    fitting.sort(key=lambda c: preference(c, blocks))
    survivors: list[Candidate] = []
    for c in fitting:
        better = next((s for s in survivors if s.micro_batch >= c.micro_batch
                       and no_more_levers(s.levers, c.levers, blocks)), None)
        if better is None:
            survivors.append(c)
        else:
            c.note = (f"dominated by {better.describe(blocks)}: no more of any lever at "
                      "no fewer samples per micro-step")
            rejected.append(c)
    start = next((c for c in survivors if not any(lever_key(c.levers, blocks))), None)
    return Candidates(survivors, rejected, start)


def _largest_fitting(bd: Predictor, target: int, sizes: Sequence[int], mode: str,
                     base: Levers, blocks: int) -> Candidate | tuple[None, Candidate] | None:
    """The lever set (mode, and `base`'s state and sharding)'s candidate at its largest
    fitting micro-batch; else (None, a row saying it does not fit); None where
    checkpointing is never needed (the set without it fits at the same micro-batch, a
    candidate of its own)."""
    for size in sorted(sizes, reverse=True):
        if mode == "none":
            levers = base
        else:
            count = bd.fewest_blocks(replace(base, checkpointing=mode), size, target)
            if count is None:
                continue
            if count == 0:
                return None
            levers = replace(base, checkpointing=mode,
                             checkpointed_blocks=None if count >= blocks else count)
        peak = bd.predict(levers, size)
        if peak <= target:
            return Candidate(levers, size, peak)
    least = replace(base, checkpointing=mode)
    peak = bd.predict(least, min(sizes))
    return None, Candidate(least, min(sizes), peak, note=(
        f"does not fit (predicted {format_size(peak)} > target {format_size(target)})"))


def split_timed(survivors: list[Candidate], limit: int = TIMED) -> list[Candidate]:
    """The first `limit` survivors (fewest levers first); the rest noted as not timed."""
    for c in survivors[limit:]:
        c.note = (f"not timed: at most {limit} candidates are timed, those with the fewest "
                  "levers first")
    return survivors[:limit]


def choose(timed: Sequence[Candidate], start: Candidate | None, blocks: int
           ) -> tuple[int, str]:
    """(index into `timed` of the one to adopt, why), from the candidates' rounds: where
    `start` (the no-lever candidate) is among them it is kept unless another is faster
    beyond the noise; else the fastest, a tie going to fewer levers (`timed` is in
    preference order). Untimed candidates (one alone, or the budget spent) go by order."""
    if not all(c.rates for c in timed):
        return 0, ("the only candidate that fits" if len(timed) == 1 else
                   "the one with the fewest levers (not timed: the budget)")
    rates = [c.rates for c in timed]
    if start is not None and start in timed:
        at = timed.index(start)
        pick, tolerance = faster_than_start(rates, at)
        if pick == at:
            return at, (f"the start, fits without levers; no lever measured faster beyond "
                        f"the noise ({tolerance:.1%})")
        gain = timed[pick].samples_per_s / start.samples_per_s - 1  # type: ignore[operator]
        return pick, (f"{gain:+.1%} samples/s over {start.describe(blocks)}, beyond the "
                      f"noise ({tolerance:.1%}): the memory it frees buys a larger "
                      "micro-batch that is faster")
    pick, tolerance = first_as_fast(rates)
    return pick, (f"the fastest that fits (ties within the noise, {tolerance:.1%}, go to "
                  "fewer levers); nothing fits without levers")


def judged_notes(timed: Sequence[Candidate], pick: int, blocks: int) -> None:
    """Each timed candidate's note against the one picked."""
    best = timed[pick]
    for c in timed:
        if c is best or c.note:
            continue
        if c.samples_per_s is None or best.samples_per_s is None:
            c.note = f"not chosen: {best.describe(blocks)} has fewer levers"
        elif c.samples_per_s < best.samples_per_s:
            c.note = (f"slower than {best.describe(blocks)} ({c.samples_per_s:.1f} vs "
                      f"{best.samples_per_s:.1f} samples/s)")
        else:
            c.note = (f"not faster than {best.describe(blocks)} beyond the noise "
                      f"({c.samples_per_s:.1f} vs {best.samples_per_s:.1f} samples/s)")


@dataclass
class MemoryPlan:
    """The levers and micro-batch chosen, and every candidate considered (a table row)."""

    levers: Levers
    micro_batch: int
    budget: int  # bytes
    target: int  # bytes: memory.target of the budget
    blocks: int  # the model's blocks (checkpointing's unit)
    start_peak: int  # the no-lever step's predicted peak at the start's micro-batch
    start_micro_batch: int
    why: str
    rows: list[Candidate] = field(default_factory=list)
    breakdown: dict[str, Any] | None = None  # Breakdown.to_dict of the measuring step
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    wall_s: float = 0.0
    # seconds per sample of a step, from the breakdown's measurement (rough: tracked),
    # for the later stages' predictions of their own time; None: not measured
    sample_s: float | None = None
    world_size: int = 1  # the ranks planned for (tune --nproc): micro-batches are per rank

    @property
    def start_fits(self) -> bool:
        """Whether the start (no levers, its micro-batch) fits the target as predicted."""
        return self.start_peak <= self.target

    @property
    def combination(self) -> str:
        return self.levers.describe(self.blocks)

    def apply(self, config: RunConfig) -> RunConfig:
        """`config` with the levers and the micro-batch (the effective batch and lr kept by
        the recipe; with batch_size auto only the levers: the batch search follows)."""
        if config.train.auto_batch:
            return config.updated(self.levers.updates())
        return planned_config(config, self.levers, self.micro_batch, self.world_size)

    def summary(self) -> str:
        """One line: what was chosen and why."""
        chosen = next((r for r in self.rows if r.chosen), None)
        if chosen is not None and chosen.measured_peak:
            peak = (f"measured peak {format_size(chosen.measured_peak)} within the "
                    f"{format_size(self.budget)} budget")
        else:
            peak = (f"predicted peak {format_size(chosen.predicted if chosen else self.start_peak)}"
                    f" of target {format_size(self.target)}")
        return f"{self.combination} at micro-batch {self.micro_batch} ({peak}): {self.why}"

    def to_dict(self) -> dict[str, Any]:
        return {"levers": asdict(self.levers), "combination": self.combination,
                "micro_batch": self.micro_batch, "budget_bytes": self.budget,
                "target_bytes": self.target, "blocks": self.blocks,
                "start_peak": self.start_peak, "start_fits": self.start_fits,
                "start_micro_batch": self.start_micro_batch, "why": self.why,
                "rows": [r.to_dict(self.blocks) for r in self.rows],
                "breakdown": self.breakdown, "notes": list(self.notes),
                "wall_s": self.wall_s, "world_size": self.world_size}

    def summary_of_start(self) -> str:
        """Where the start stands: its predicted peak against the target."""
        return (f"no lever at micro-batch {self.start_micro_batch} is predicted at "
                f"{format_size(self.start_peak)}, "
                + ("within" if self.start_fits else "over") +
                f" the target {format_size(self.target)}")

    def render(self) -> str:
        return render_plan(self.to_dict())


def render_plan(plan: dict[str, Any]) -> str:
    """The plan's table (from MemoryPlan.to_dict, as --json and the tune report hold it):
    each combination, its predicted and measured peak, samples/s and spread, why."""
    w = max([len("combination"), *(len(r["combination"]) for r in plan["rows"])])
    ranks = plan.get("world_size", 1) > 1  # N ranks: a column says how each row was timed
    lines = [f"memory plan: target {format_size(plan['target_bytes'])} (memory.target of "
             f"{format_size(plan['budget_bytes'])}); {_start_line(plan)}",
             f"  {'combination':<{w}} {'micro-batch':>11} {'predicted':>10} "
             f"{'measured':>10} {'samples/s':>10} {'spread':>7}"
             + (f" {'timed on':>10}" if ranks else "") + "  why"]
    for r in plan["rows"]:
        sps = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        spread = f"{100 * r['spread']:.1f}%" if r["spread"] is not None else "-"
        measured = format_size(r["measured_peak"]) if r["measured_peak"] else "-"
        timed = f" {timed_on(r):>10}" if ranks else ""
        lines.append(f"  {r['combination']:<{w}} {r['micro_batch']:>11} "
                     f"{format_size(r['predicted_peak']):>10} {measured:>10} {sps:>10} "
                     f"{spread:>7}{timed}  {r['note']}".rstrip())
    lines += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def timed_on(row: dict[str, Any]) -> str:
    """How an N-rank plan's row was timed: "N ranks" (trained for real), "projection" (a
    sharded row not measured on the ranks: one process's compute, or untimed), "1 process"
    (a ddp row timed in one process, communication aside), "-" (untimed)."""
    if row.get("timed_on_ranks"):
        return f"{row['timed_on_ranks']} ranks"
    if row["levers"].get("strategy") == "fsdp":
        return "projection"
    return "1 process" if row["samples_per_s"] else "-"


def _start_line(plan: dict[str, Any]) -> str:
    fits = "fits" if plan["start_fits"] else "does not fit"
    return (f"without levers at micro-batch {plan['start_micro_batch']} the step is "
            f"predicted at {format_size(plan['start_peak'])}: it {fits}")


def planned_config(config: RunConfig, levers: Levers, micro_batch: int, ranks: int = 1
                   ) -> RunConfig:
    """What training runs for `levers` at `micro_batch` (a rank's, of `ranks`): the
    effective batch the run would have had kept by accumulation (recipe.py), the lr and
    evaluation batch as they were."""
    base = config.updated({**levers.updates(), "train.batch_size": micro_batch,
                           "train.effective_batch_size": kept_batch(config)})
    return recipe(base, micro_batch, None, ranks).apply(base)


def fits_already(start_peak: int, target: int, levers: Levers, micro_batch: int,
                 budget: int, blocks: int, breakdown: dict[str, Any] | None = None
                 ) -> MemoryPlan:
    """The plan where the start fits as configured: its own levers, nothing timed."""
    why = (f"fits already (predicted {format_size(start_peak)} <= target "
           f"{format_size(target)}): no lever needed")
    row = Candidate(levers, micro_batch, start_peak, note="chosen: " + why, chosen=True)
    return MemoryPlan(levers, micro_batch, budget, target, blocks, start_peak, micro_batch,
                      why, [row], breakdown)


def nothing_fits(rejected: Sequence[Candidate], target: int, blocks: int) -> str:
    """The sentence for a model no combination fits: the least any would need."""
    least = min(rejected, key=lambda c: c.predicted, default=None)
    if least is None:
        return f"no combination of memory levers fits memory.target ({format_size(target)})"
    return (f"no combination of memory levers fits memory.target: the least, "
            f"{least.describe(blocks)}, is predicted at {format_size(least.predicted)} > "
            f"{format_size(target)}; raise memory.budget (--memory-budget) or "
            "memory.target, or make the model smaller")
