"""tune --nproc N's choice between strategies from their rates measured on N ranks
(tuning/rank_timing.py, through plan_memory), on an injected breakdown and injected
launches: nothing is built, launched or timed."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from redline.config import RunConfig, load_config
from redline.device import DeviceInfo
from redline.errors import ConfigError
from redline.memory.levers import Levers
from redline.tuning import memory_plan_run
from redline.tuning.memory_plan import (
    SHARDINGS,
    Candidate,
    MemoryPlan,
    enumerate_candidates,
    render_plan,
)
from redline.tuning.memory_plan_run import plan_memory
from redline.tuning.rank_timing import RANK_ROUNDS, RANK_WARM, RankRun, rate_of

from ..conftest import TOY

CPU = DeviceInfo.detect("cpu")
MiB = 1 << 20


@dataclass
class ShardedFake:
    """A step's memory per rank: 16 MiB of states (8 MiB sharded over 2 ranks) and 8 MiB a
    sample; no blocks. Under a 50 MiB budget (target 42.5 MiB) at micro-batch 4: ddp 48 MiB
    does not fit, ddp at 2 (32 MiB) and fsdp at 4 (40 MiB) do."""

    micro_batch: int = 2
    samples_per_step: int = 0
    world_size: int = 1

    @property
    def blocks(self) -> list[str]:
        return []

    def predict(self, levers: Levers, micro_batch: int) -> int:
        return (8 if levers.sharded else 16) * MiB + 8 * MiB * micro_batch

    def fewest_blocks(self, levers: Levers, micro_batch: int, limit: int) -> int | None:
        return None

    def to_dict(self) -> dict:
        return {"fake": True}


def _plan(monkeypatch: pytest.MonkeyPatch, rates: dict[str, float | None],
          fits: bool = True, budget: str = "50MiB", peaks: dict[str, int] | None = None
          ) -> tuple[MemoryPlan, list[str]]:
    """plan_memory for 2 ranks with each strategy's launch giving `rates[strategy]`
    samples/s (None: out of memory); the strategies launched, in order."""
    monkeypatch.setattr(memory_plan_run, "_breakdown",
                        lambda *a, **k: (ShardedFake(), 0.01, ("none",), False))
    monkeypatch.setattr(memory_plan_run, "sharding_note", lambda bd, mb: "sharding")
    monkeypatch.setattr(memory_plan_run, "verify", lambda *a: 30 * MiB)
    launched: list[str] = []

    def launcher(config: RunConfig, ranks: int) -> RankRun:
        assert ranks == 2
        d = config.distributed
        key = d.strategy if d.strategy == "ddp" else f"fsdp-{d.reshard_after_forward}"
        launched.append(key)
        rate = rates[key]
        if rate is None:
            return RankRun(None, wall_s=1.0, oom=True, error="OutOfMemoryError: budget")
        return RankRun(rate, (peaks or {}).get(key, 20 * MiB), wall_s=1.0)

    config = load_config(None, [f"task={TOY}", f"memory.budget={budget}", "train.batch_size=4",
                                "train.effective_batch_size=8"])
    plan = plan_memory(object(), config, CPU, states=("fp32",), modes=("none",),  # type: ignore[arg-type]
                       world_size=2, fits=lambda s: fits, launcher=launcher)
    return plan, launched


def _row(plan: MemoryPlan, strategy: str, reshard: bool = False) -> Candidate:
    return next(r for r in plan.rows if r.levers.strategy == strategy and (
        strategy == "ddp" or r.levers.reshard_after_forward == reshard))


def test_fsdp_at_a_larger_micro_batch_but_measured_slower_on_the_ranks_gives_ddp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, launched = _plan(monkeypatch, {"ddp": 100.0, "fsdp-False": 60.0,
                                         "fsdp-True": 55.0})
    # interleaved: every candidate once a round, every round
    assert launched == ["ddp", "fsdp-False"] * RANK_ROUNDS
    assert (plan.levers.strategy, plan.micro_batch) == ("ddp", 2)
    assert plan.why.startswith("measured on 2 ranks")
    ddp, fsdp = _row(plan, "ddp"), _row(plan, "fsdp")
    assert fsdp.micro_batch == 4 and fsdp.rates == [60.0] * RANK_ROUNDS
    assert fsdp.note.startswith("slower than ddp")
    assert ddp.chosen and ddp.measured_peak == 20 * MiB and ddp.ranks == fsdp.ranks == 2
    table = render_plan(plan.to_dict())
    assert re.search(r"ddp, no lever .* 2 ranks  chosen: measured on 2 ranks", table)
    assert "timed on" in table and "include the communication" in table
    assert plan.apply(load_config(None, [f"task={TOY}"])).distributed.strategy == "ddp"


def test_a_tie_on_the_ranks_goes_to_ddp_and_a_clear_win_to_fsdp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tie, _ = _plan(monkeypatch, {"ddp": 100.0, "fsdp-False": 101.0, "fsdp-True": 101.0})
    assert tie.levers.strategy == "ddp"
    assert _row(tie, "fsdp").note.startswith("not faster than ddp")
    win, _ = _plan(monkeypatch, {"ddp": 100.0, "fsdp-False": 150.0, "fsdp-True": 150.0})
    assert (win.levers.strategy, win.levers.reshard_after_forward, win.micro_batch) == (
        "fsdp", False, 4)
    assert "2 ranks" in render_plan(win.to_dict())


def test_a_candidate_out_of_memory_on_the_ranks_does_not_fit_and_the_next_is_chosen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, launched = _plan(monkeypatch, {"ddp": None, "fsdp-False": 60.0,
                                         "fsdp-True": 60.0})
    assert launched.count("ddp") == 1  # not launched again after its OOM
    assert plan.levers.strategy == "fsdp"
    ddp = _row(plan, "ddp")
    assert not ddp.chosen and ddp.note.startswith(
        "does not fit: out of memory on 2 ranks under the per-rank budget 50.0 MiB")


def test_a_candidate_over_memory_target_on_the_ranks_is_not_taken_however_fast(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, _ = _plan(monkeypatch, {"ddp": 100.0, "fsdp-False": 150.0, "fsdp-True": 150.0},
                    peaks={"fsdp-False": 45 * MiB})  # under the 50 MiB budget, over 42.5
    assert plan.levers.strategy == "ddp" and "the only one left of those measured" in plan.why
    assert _row(plan, "fsdp").note.startswith(
        "over memory.target on 2 ranks (measured 45.0 MiB > target 42.5 MiB")


def test_without_the_time_nothing_is_launched_and_fsdp_stays_a_projection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, launched = _plan(monkeypatch, {"ddp": 100.0, "fsdp-False": 60.0,
                                         "fsdp-True": 60.0}, fits=False)
    assert launched == []
    fsdp = _row(plan, "fsdp")
    assert fsdp.note.startswith("not measured on 2 ranks") and not fsdp.ranks
    assert re.search(r"fsdp, gathered blocks kept to backward .* projection  not measured",
                     render_plan(plan.to_dict()))


def test_fsdp_alone_is_launched_once_to_verify_it_and_an_oom_there_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 27 MiB, target 22.95: ddp at micro-batch 1 (24 MiB) does not fit; fsdp at 1 does
    plan, launched = _plan(monkeypatch, {"fsdp-False": 60.0}, budget="27MiB")
    assert launched == ["fsdp-False"]
    assert (plan.levers.strategy, plan.micro_batch) == ("fsdp", 1)
    assert _row(plan, "fsdp").ranks == 2 and "measured on 2 ranks" in plan.why
    with pytest.raises(ConfigError, match=r"failed on 2 ranks .*fsdp, gathered blocks kept "
                       r"to backward at micro-batch 1: does not fit: out of memory on 2 ranks"):
        _plan(monkeypatch, {"fsdp-False": None}, budget="27MiB")


def test_a_launch_rate_is_the_median_after_warm_up() -> None:
    records = [{"step": s, "samples_per_s": 10.0 * s, "mem_peak_bytes": 100 + s}
               for s in range(1, 8)]
    rate, peak = rate_of(records)
    steady = [10.0 * s for s in range(RANK_WARM + 1, 8)]
    assert rate == steady[len(steady) // 2] and peak == 107


def test_a_state_fsdp_refuses_is_never_a_sharded_candidate() -> None:
    found = enumerate_candidates(ShardedFake(), 100 * MiB, [1, 2], ("none",),
                                 ("fp32", "4bit"), SHARDINGS)
    combos = {(c.levers.strategy, c.levers.optimizer_state)
              for c in found.survivors + found.rejected}
    assert ("ddp", "4bit") in combos and ("fsdp", "fp32") in combos
    assert ("fsdp", "4bit") not in combos  # job/build.py refuses it: a launch would fail
