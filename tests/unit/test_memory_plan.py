"""The memory plan's decision (tuning/memory_plan.py), on injected breakdowns and rates:
no timing, no model."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from redline.config import load_config
from redline.device import DeviceInfo
from redline.errors import ConfigError
from redline.memory.levers import Levers
from redline.tuning import memory_plan_run
from redline.tuning.memory_plan import (
    MODES,
    Candidate,
    MemoryPlan,
    choose,
    enumerate_candidates,
    judged_notes,
    micro_batches,
    split_timed,
)
from redline.tuning.memory_plan_run import plan_memory

from ..conftest import TOY

CPU = DeviceInfo.detect("cpu")

MiB = 1 << 20
STATE = {"fp32": 8.0, "bf16": 4.0, "8bit": 2.0, "4bit": 1.0}


@dataclass
class FakeBreakdown:
    """A step's memory, linear in the micro-batch: `params` bytes of parameters (as many
    of gradients), the state by kind per element, and per block and sample what each mode
    keeps (`acts`: none, selective, full)."""

    elements: int = 1 << 20  # 4 MiB of fp32 parameters
    n_blocks: int = 4
    acts: tuple[int, int, int] = (4 * MiB, 2 * MiB, 1 * MiB)  # per block, per sample

    @property
    def blocks(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.n_blocks)]

    def predict(self, levers: Levers, micro_batch: int) -> int:
        fixed = int(self.elements * (4 + 4 + STATE[levers.optimizer_state]))
        count = 0 if levers.checkpointing == "none" else (
            self.n_blocks if levers.checkpointed_blocks is None else levers.checkpointed_blocks)
        mode = {"none": 0, "selective": 1, "full": 2}[levers.checkpointing]
        per_sample = sum(self.acts[mode if i < count else 0] for i in range(self.n_blocks))
        return fixed + per_sample * micro_batch

    def fewest_blocks(self, levers: Levers, micro_batch: int, limit: int) -> int | None:
        for count in range(self.n_blocks + 1):
            if self.predict(Levers(levers.checkpointing, count, levers.optimizer_state),
                            micro_batch) <= limit:
                return count
        return None


def timed(*candidates: tuple[Levers, int, list[float]]) -> list[Candidate]:
    return [Candidate(levers, mb, 0, rates=rates) for levers, mb, rates in candidates]


def test_sizes_are_the_powers_of_two_up_to_the_cap_and_the_start() -> None:
    assert micro_batches(16, 16) == [1, 2, 4, 8, 16]
    assert micro_batches(24, 12) == [1, 2, 4, 8, 12, 16]


def test_a_lever_set_keeps_its_largest_fitting_micro_batch_and_the_fewest_blocks() -> None:
    bd = FakeBreakdown()
    # no lever: 16 MiB + 16 MiB a sample; target 60 MiB: micro-batch 2 fits (48 MiB)
    found = enumerate_candidates(bd, 60 * MiB, [1, 2, 4], states=("fp32",))
    by_mode = {c.levers.checkpointing: c for c in found.survivors}
    assert found.start is by_mode["none"] and found.start.micro_batch == 2
    # full at 4: 16 + 4 * (n*1 + (4-n)*4) <= 60 -> n >= 2 blocks (56 MiB), not all four
    full = by_mode["full"]
    assert (full.micro_batch, full.levers.checkpointed_blocks) == (4, 2)
    assert full.predicted == bd.predict(full.levers, 4) <= 60 * MiB
    assert bd.predict(Levers("full", 1), 4) > 60 * MiB  # one block would not do
    # at a micro-batch that needs them all, "every block" (checkpointed_blocks null)
    found = enumerate_candidates(bd, 48 * MiB, [8], states=("fp32",))
    assert [(c.levers.checkpointing, c.levers.checkpointed_blocks)
            for c in found.survivors] == [("full", None)]


def test_a_candidate_with_more_levers_at_no_larger_micro_batch_is_dominated() -> None:
    bd = FakeBreakdown()
    found = enumerate_candidates(bd, 60 * MiB, [1, 2, 4, 8, 16],
                                 states=("fp32", "8bit"))
    kept = {(c.levers.checkpointing, c.levers.optimizer_state): c for c in found.survivors}
    dropped = {(c.levers.checkpointing, c.levers.optimizer_state): c for c in found.rejected}
    # 8bit states alone: 10 MiB + 16 a sample -> micro-batch 2, as without: only slower
    assert ("none", "8bit") in dropped
    assert "dominated by no lever at micro-batch 2" in dropped[("none", "8bit")].note
    assert ("none", "fp32") in kept and ("full", "fp32") in kept
    # the order of preference: fewer levers first
    assert found.survivors[0] is found.start


def test_a_combination_over_the_target_says_by_how_much() -> None:
    bd = FakeBreakdown()
    found = enumerate_candidates(bd, 23 * MiB, [1, 2], states=("fp32",))
    notes = {c.levers.checkpointing: c.note for c in found.rejected}
    assert found.start is None
    assert notes["none"] == "does not fit (predicted 32.0 MiB > target 23.0 MiB)"
    assert notes["selective"] == "does not fit (predicted 24.0 MiB > target 23.0 MiB)"
    # full on 3 of 4 blocks at micro-batch 1: 16 + 3 + 4 = 23 MiB
    assert [(c.levers.checkpointing, c.levers.checkpointed_blocks, c.micro_batch)
            for c in found.survivors] == [("full", 3, 1)]


def test_fits_without_levers_a_lever_is_adopted_only_when_faster_beyond_the_noise() -> None:
    start, lever = Levers(), Levers("full", None)
    close = timed((start, 2, [100.0, 101.0, 99.0]), (lever, 8, [101.5, 102.0, 101.0]))
    pick, why = choose(close, close[0], 4)
    assert pick == 0 and "no lever measured faster" in why
    faster = timed((start, 2, [100.0, 101.0, 99.0]), (lever, 8, [130.0, 131.0, 129.0]))
    pick, why = choose(faster, faster[0], 4)
    assert pick == 1 and "+30.0%" in why and "larger micro-batch" in why


def test_nothing_fits_without_levers_the_fastest_wins_and_ties_go_to_fewer_levers() -> None:
    selective, full = Levers("selective", None), Levers("full", None)
    tie = timed((selective, 4, [100.0, 100.0, 100.0]), (full, 8, [101.0, 101.0, 101.0]))
    assert choose(tie, None, 4)[0] == 0
    clear = timed((selective, 4, [80.0, 80.0, 80.0]), (full, 8, [101.0, 101.0, 101.0]))
    pick, why = choose(clear, None, 4)
    assert pick == 1 and "nothing fits without levers" in why
    judged_notes(clear, pick, 4)
    assert clear[0].note.startswith("slower than full checkpointing of every block at "
                                    "micro-batch 8 (80.0 vs 101.0")


def test_untimed_candidates_go_to_the_fewest_levers() -> None:
    cands = [Candidate(Levers("selective"), 4, 0), Candidate(Levers("full"), 8, 0)]
    assert choose(cands, None, 4) == (0, "the one with the fewest levers (not timed: the "
                                         "budget)")


def test_at_most_the_cap_is_timed_and_the_rest_say_why() -> None:
    cands = [Candidate(Levers(), i + 1, 0) for i in range(8)]
    assert split_timed(cands, 6) == cands[:6]
    assert all(c.note.startswith("not timed: at most 6") for c in cands[6:])


class MeasuredFake(FakeBreakdown):
    micro_batch = 2  # the micro-batch it was "measured" at

    def to_dict(self) -> dict:
        return {"fake": True}


def _plan(monkeypatch: pytest.MonkeyPatch, budget: str, **sets: object) -> MemoryPlan:
    """plan_memory on the injected breakdown: nothing is built, stepped or timed."""
    monkeypatch.setattr(memory_plan_run, "_breakdown",
                        lambda *a, **k: (MeasuredFake(), 0.01, MODES, False))
    config = load_config(None, [f"task={TOY}", f"memory.budget={budget}",
                                "train.batch_size=4",
                                *(f"{k}={v}" for k, v in sets.items())])
    return plan_memory(object(), config, CPU, states=("fp32",))  # type: ignore[arg-type]


def test_a_start_that_fits_already_gets_no_lever_and_nothing_is_timed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # no lever at micro-batch 4: 16 + 64 = 80 MiB; target 85 % of 100 MiB
    plan = _plan(monkeypatch, "100MiB")
    assert plan.levers.none and plan.start_fits and plan.micro_batch == 4
    assert [r.note for r in plan.rows] == [
        "chosen: fits already (predicted 80.0 MiB <= target 85.0 MiB): no lever needed"]
    assert plan.apply(load_config(None, [f"task={TOY}", "train.batch_size=4"])
                      ).memory.activation_checkpointing == "none"


def test_auto_checkpointing_that_fits_already_resolves_to_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(monkeypatch, "100MiB", **{"memory.activation_checkpointing": "auto"})
    assert plan.levers.updates()["memory.activation_checkpointing"] == "none"


def test_nothing_fits_is_one_sentence_with_the_least_any_would_need(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "no combination of memory levers fits memory.target: the least, full "
            "checkpointing of every block at micro-batch 1, is predicted at 20.0 MiB > "
            "17.0 MiB")):
        _plan(monkeypatch, "20MiB")


def test_untimed_choice_verified_under_the_budget_and_an_oom_takes_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def verify(task: object, config: object, device: object, budget: int) -> int | None:
        return None if config.memory.activation_checkpointing == "none" else 50 * MiB  # type: ignore[attr-defined]

    monkeypatch.setattr(memory_plan_run, "verify", verify)
    monkeypatch.setattr(memory_plan_run, "_breakdown",
                        lambda *a, **k: (MeasuredFake(), 0.01, MODES, False))
    config = load_config(None, [f"task={TOY}", "memory.budget=60MiB", "train.batch_size=4"])
    plan = plan_memory(object(), config, CPU, states=("fp32",),  # type: ignore[arg-type]
                       fits=lambda seconds: False)  # the budget leaves no time to time them
    assert not plan.start_fits  # 80 MiB at micro-batch 4 > 51
    rows = {r.levers.checkpointing: r for r in reversed(plan.rows)}  # the first of each
    assert rows["none"].micro_batch == 2 and rows["none"].note.startswith(
        "out of memory under the budget when verified")
    chosen = next(r for r in plan.rows if r.chosen)
    assert chosen is rows["selective"] and chosen.measured_peak == 50 * MiB
    assert any(n.startswith("not timed: timing 3 candidates") for n in plan.notes)
    tuned = plan.apply(config)
    assert tuned.memory.activation_checkpointing == "selective"
    assert (tuned.train.batch_size, tuned.train.samples_per_step) == (plan.micro_batch, 4)


def test_a_choice_that_does_not_fit_when_verified_is_tried_at_half_the_micro_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The prediction was short (bench/levers.py: a GPT's full checkpointing at micro-batch
    # 2 measured 24 % over it): every candidate runs out of memory above micro-batch 1, so
    # the plan must not refuse while the same levers fit at half the micro-batch.
    def verify(task: object, config: object, device: object, budget: int) -> int | None:
        return 40 * MiB if config.train.batch_size == 1 else None  # type: ignore[attr-defined]

    monkeypatch.setattr(memory_plan_run, "verify", verify)
    monkeypatch.setattr(memory_plan_run, "_breakdown",
                        lambda *a, **k: (MeasuredFake(), 0.01, MODES, False))
    config = load_config(None, [f"task={TOY}", "memory.budget=60MiB", "train.batch_size=4"])
    plan = plan_memory(object(), config, CPU, states=("fp32",),  # type: ignore[arg-type]
                       fits=lambda seconds: False)
    chosen = next(r for r in plan.rows if r.chosen)
    assert (chosen.levers.none, chosen.micro_batch, chosen.measured_peak) == (True, 1,
                                                                              40 * MiB)
    failed = [(r.levers.checkpointing, r.micro_batch) for r in plan.rows
              if r.note.startswith("out of memory under the budget when verified")]
    assert ("none", 2) in failed  # its half, micro-batch 1, was then verified and chosen
    assert [r.micro_batch for r in plan.rows if "half the micro-batch" in r.note] == [2, 2]
    tuned = plan.apply(config)
    assert (tuned.train.batch_size, tuned.train.samples_per_step) == (1, 4)  # kept


def test_a_choice_over_memory_target_when_verified_is_not_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # under the budget (60 MiB) but over its target (51): the headroom is the user's
    peaks = {"none": None, "selective": 55 * MiB, "full": 45 * MiB}

    def verify(task: object, config: object, device: object, budget: int) -> int | None:
        return peaks[config.memory.activation_checkpointing]  # type: ignore[attr-defined]

    monkeypatch.setattr(memory_plan_run, "verify", verify)
    monkeypatch.setattr(memory_plan_run, "_breakdown",
                        lambda *a, **k: (MeasuredFake(), 0.01, MODES, False))
    config = load_config(None, [f"task={TOY}", "memory.budget=60MiB", "train.batch_size=4"])
    plan = plan_memory(object(), config, CPU, states=("fp32",),  # type: ignore[arg-type]
                       fits=lambda seconds: False)
    assert plan.levers.checkpointing == "full"
    over = [r for r in plan.rows if r.note.startswith("over memory.target when verified")]
    assert [r.levers.checkpointing for r in over] == ["selective"]
