"""The memory plan's strategies timed on N ranks for real (`redline tune --nproc N`).

One process can time a ddp or fsdp candidate's compute, not its communication: FSDP moves
1.5x DDP's bytes a step (two all-gathers and a reduce-scatter per block against one all-
reduce; docs/distributed.md measured 2.5x DDP's step time on a states-dominated MLP over
gloo), so a plan that ranks them by one process's compute may pick fsdp where it is the
slower, and a choice that makes training slower is worse than none. Where more than one
strategy (ddp, fsdp keeping or resharding the gathered blocks) survives the memory
prediction, the leading survivors (the first of each strategy, then by preference, at
most RANK_TIMED) each train for real on this host: `redline train --config CANDIDATE.yaml
--nproc N --steps RANK_STEPS` with the OOM guard off (an OOM under the per-rank budget is
seen, and the candidate recorded as not fitting, with the reason), in interleaved rounds
(A B C, A B C, ...) as many as the tune budget allows, up to RANK_ROUNDS. A round's rate
is the median samples/s over its steps after RANK_WARM warm-up steps (metrics.jsonl,
logged every step). A sharded candidate alone is launched once: there is no choice to
time, but its per-rank peak, which one process cannot verify, is verified under the
budget. The choice goes by the measured rates through judge.py, as every timing of tune
does: the no-lever ddp start is kept unless another is faster beyond the noise; else the
first, in preference order (ddp, then fewer levers), within the noise of the fastest.
Candidates not measured keep the projection label; where none could be measured, the plan
falls back to one process's timing (memory_plan_run.py).

The launcher is a parameter (`Launcher`), so the choice is tested with injected rates.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from redline.config import ConfigError, RunConfig
from redline.memory.sizes import format_size
from redline.tuning.memory_plan import (
    Candidate,
    Candidates,
    choose,
    judged_notes,
    planned_config,
    preference,
    shard_rank,
)

RANK_TIMED = 3  # candidates trained on N ranks at most: each launch costs seconds
RANK_ROUNDS = 3  # interleaved rounds at most, as the budget allows
RANK_STEPS = 8  # steps a launch trains
RANK_WARM = 2  # of them, warm-up: not in the rate
LAUNCH_S = 20.0  # a launch's first guess (torchrun, N imports, the first step); then measured
TIMEOUT_S = 600.0  # one launch at most: a hung one is a failure, not a stalled tune


@dataclass
class RankRun:
    """One launch's outcome: its rate (samples/s over the steps after warm-up) and rank 0's
    peak, or why it failed (`oom`: out of memory under the per-rank budget)."""

    rate: float | None
    peak: int | None = None  # bytes
    wall_s: float = 0.0
    error: str | None = None
    oom: bool = False


Launcher = Callable[[RunConfig, int], RankRun]  # (the candidate's config, ranks)
Say = Callable[[str], None]


def rate_of(records: Sequence[dict]) -> tuple[float | None, int | None]:
    """(the median samples/s of the steps after warm-up, the largest mem_peak_bytes), from
    metrics.jsonl records logged every step."""
    steady = [r for r in records if r.get("step", 0) > RANK_WARM and r.get("samples_per_s")]
    peaks = [r["mem_peak_bytes"] for r in records if r.get("mem_peak_bytes")]
    rate = statistics.median(r["samples_per_s"] for r in steady) if steady else None
    return rate, max(peaks) if peaks else None


def train_on_ranks(config: RunConfig, ranks: int) -> RankRun:
    """`config` trained RANK_STEPS steps on `ranks` processes of this host (redline train
    --nproc: torchrun), in a scratch directory."""
    t0 = time.perf_counter()
    task = config.task or ""
    module, sep, attr = task.rpartition(":")
    if sep and module.endswith(".py"):  # as the tuned config has it (workflow.write_tuned)
        config = config.updated({"task": f"{Path(module).resolve()}:{attr}"})
    with tempfile.TemporaryDirectory(prefix="redline-ranks-") as scratch:
        path = Path(scratch) / "candidate.yaml"
        path.write_text(config.updated({"memory.oom_guard": False, "telemetry.log_every": 1,
                                        "train.eval_batches": 1}).to_yaml())
        cmd = [sys.executable, "-m", "redline", "train", "--config", str(path), "--nproc",
               str(ranks), "--steps", str(RANK_STEPS), "--run-dir", f"{scratch}/run",
               "--no-progress", "--no-report", "--json"]
        try:
            # the user's directory: the config's relative paths mean what they meant
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return RankRun(None, wall_s=time.perf_counter() - t0,
                           error=f"no result in {TIMEOUT_S:.0f} s")
        wall = time.perf_counter() - t0
        metrics = Path(scratch) / "run" / "metrics.jsonl"
        if out.returncode != 0 or not metrics.exists():
            text = _error(out.stdout, out.stderr)
            return RankRun(None, wall_s=wall, error=text,
                           oom="OutOfMemoryError" in text or "out of memory" in text)
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    rate, peak = rate_of(records)
    return RankRun(rate, peak, wall, None if rate else "no step after warm-up was logged")


def _error(stdout: str, stderr: str) -> str:
    """The failed run's one sentence: its --json error, else stderr's last line."""
    try:
        return str(json.loads(stdout.strip().splitlines()[-1])["error"])
    except (ValueError, KeyError, IndexError, TypeError):
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else "it exited without a result"


def on_ranks(survivors: Sequence[Candidate]) -> bool:
    """Whether the survivors are trained on the ranks: more than one strategy (ddp, fsdp
    keeping, fsdp resharding) to choose between, or a sharded one, whose per-rank peak one
    process cannot verify (one launch then, its verification under the budget)."""
    shards = {shard_rank(c.levers) for c in survivors}
    return len(shards) > 1 or any(shards)


def leading(survivors: Sequence[Candidate], blocks: int, limit: int = RANK_TIMED
            ) -> list[Candidate]:
    """The first survivor of each strategy, then the next by preference, at most `limit`,
    in preference order."""
    firsts: dict[int, Candidate] = {}
    for c in survivors:
        firsts.setdefault(shard_rank(c.levers), c)
    picked = list(firsts.values())[:limit]
    picked += [c for c in survivors if c not in picked][:limit - len(picked)]
    return sorted(picked, key=lambda c: preference(c, blocks))


def time_on_ranks(configs: Sequence[RunConfig], cands: Sequence[Candidate], ranks: int,
                  budget: int, blocks: int, fits: Callable[[float], bool],
                  launcher: Launcher = train_on_ranks, say: Say = lambda _: None
                  ) -> list[str]:
    """Each candidate trained on `ranks` ranks in interleaved rounds while `fits(seconds)`
    allows (module docstring): its rates and `ranks` set, or, where its launch failed, its
    note (an OOM: does not fit). The notes for the plan: what the budget left out."""
    notes: list[str] = []
    walls: list[float] = []  # each launch's seconds: the next is guessed at their most
    failed: set[int] = set()
    for r in range(RANK_ROUNDS if len(cands) > 1 else 1):  # one: nothing to compare
        live = [i for i, c in enumerate(cands) if i not in failed and (r == 0 or c.rates)]
        guess = max(walls, default=LAUNCH_S)
        if r and not fits(guess * len(live)):
            notes.append(f"{r} round(s) on {ranks} ranks of {RANK_ROUNDS}: the next would "
                         f"take about {guess * len(live):.0f} s, past --budget-s")
            break
        for i in live:
            c = cands[i]
            if r == 0 and not fits(guess):
                c.note = (f"not measured on {ranks} ranks: a launch takes about {guess:.0f} "
                          "s, past --budget-s (raise it)")
                continue
            say(f"memory plan: training {c.describe(blocks)} on {ranks} ranks "
                f"(round {r + 1})")
            run = launcher(configs[i], ranks)
            walls.append(run.wall_s)
            guess = max(walls)
            if run.rate is None:
                failed.add(i)
                c.rates, c.ranks = [], 0
                c.note = (f"does not fit: out of memory on {ranks} ranks under the per-rank "
                          f"budget {format_size(budget)} ({run.error})" if run.oom else
                          f"failed on {ranks} ranks: {run.error}")
                continue
            c.rates.append(run.rate)
            c.ranks = ranks
            if run.peak:
                c.measured_peak = max(c.measured_peak or 0, run.peak)
    return notes


def choose_measured(cands: Sequence[Candidate], start: Candidate | None, blocks: int,
                    ranks: int, left: Sequence[Candidate] | None = None
                    ) -> tuple[Candidate, str] | None:
    """The one to adopt among those of `cands` measured on `ranks` ranks and still `left`
    (default: all; module docstring), its row marked and the others' notes judged; None
    where none was."""
    pool = sorted((c for c in cands if c.ranks == ranks and c.rates
                   and (left is None or c in left)),
                  key=lambda c: preference(c, blocks))
    if not pool:
        return None
    pick, why = choose(pool, start if start in pool else None, blocks)
    if len(pool) == 1:
        why = ("the only candidate that fits" if len(cands) == 1 else
               "the only one left of those measured (the others' rows say why)")
    chosen = pool[pick]
    why = f"measured on {ranks} ranks: {why}"
    chosen.chosen, chosen.note = True, "chosen: " + why
    judged_notes(pool, pick, blocks)
    return chosen, why


def choose_on_ranks(config: RunConfig, found: Candidates, blocks: int, budget: int, ranks: int,
                    fits: Callable[[float], bool] | None, say: Say, notes: list[str],
                    launcher: Launcher) -> tuple[Candidate, str] | None:
    """The leading survivors trained on `ranks` ranks and the choice among those measured
    (module docstring); those whose launch failed go to the rejected; None where none was
    measured (the plan times in one process then, the projection)."""
    cands = leading(found.survivors, blocks)
    for c in found.survivors:
        if c not in cands:
            c.note = (f"not measured on {ranks} ranks: at most {RANK_TIMED} are trained (the "
                      "first of each strategy first)")
    configs = [planned_config(config, c.levers, c.micro_batch, ranks) for c in cands]
    notes += time_on_ranks(configs, cands, ranks, budget, blocks,
                           fits or (lambda _: True), launcher, say)
    # memory.target, not the budget: the headroom the user keeps is not the plan's to fill
    target = int(config.memory.target * budget)
    for c in cands:
        over = bool(c.rates) and (c.measured_peak or 0) > target
        if over:
            c.note = (f"over memory.target on {ranks} ranks (measured "
                      f"{format_size(c.measured_peak or 0)} > target {format_size(target)}; "
                      f"predicted {format_size(c.predicted)})")
        if over or (not c.rates and c.note.startswith(("does not fit", "failed"))):
            found.survivors.remove(c)
            found.rejected.insert(0, c)
    if not found.survivors:
        why = "; ".join(f"{c.describe(blocks)}: {c.note}" for c in cands)
        raise ConfigError(f"every candidate of the memory plan failed on {ranks} ranks "
                          f"({why}); raise memory.budget (--memory-budget) or memory.target")
    picked = choose_measured(cands, found.start, blocks, ranks, found.survivors)
    if picked is not None:
        notes.append(f"rows timed on {ranks} ranks trained {RANK_STEPS} steps each under "
                     f"torchrun (the first {RANK_WARM} not timed), in interleaved rounds: "
                     "their samples/s include the communication; the rest were not timed "
                     "(fsdp rows: projections, their peak predicted per rank)")
    return picked
