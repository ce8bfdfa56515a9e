from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from redline import batch as batch_tree
from redline.config import load_config
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.job.build import build_optimizer
from redline.memory.probe import live_tensor_bytes, measure_peak
from redline.task import resolve_task
from redline.tuning import batchsearch, knee
from redline.tuning.autobatch import autobatch, choose_knee
from redline.tuning.knee import near_the_best
from redline.tuning.recipe import scaled_lr
from redline.tuning.trial import Timing

from ..conftest import TOY

CPU = DeviceInfo.detect("cpu")
ARGS = [f"task={TOY}", "task_args.n=2048", "task_args.hidden=512", "memory.budget=2MiB"]


def _peak_at(size: int) -> int:
    """Peak of a real training step at `size`, measured the way a budget counts it."""
    config = load_config(None, ARGS)
    task = resolve_task(config.task, config.task_args)
    torch.manual_seed(0)
    model = task.build_model()
    opt = build_optimizer(model, 1e-3)
    engine = Engine(model, opt, "fp32", grad_clip=1.0)
    data = task.train_data()
    batch = batch_tree.first_samples(data, size)
    engine.step(batch, task.loss)  # allocate optimizer state first, as in training
    opt.zero_grad(set_to_none=True)  # grads freed inside the step must not be in the baseline
    return measure_peak(lambda: engine.step(batch, task.loss), CPU,
                        baseline=live_tensor_bytes(model, opt)).peak_bytes


@pytest.mark.slow
def test_finds_the_largest_fitting_size_in_three_probes_and_one_verification(
        tmp_path: Path) -> None:
    config = load_config(None, ARGS)
    task = resolve_task(config.task, config.task_args)
    result = autobatch(task, config, CPU, cache_dir=tmp_path, measure_throughput=False)
    assert result.probe_steps <= 3 and result.verify_steps == 1
    target = result.target_bytes
    assert _peak_at(result.max_fit) <= target
    # Within one size step (10 %) of the true largest size.
    assert _peak_at(int(result.max_fit * 1.1) + 1) > target


@pytest.mark.slow
def test_cache_hit_costs_one_step(tmp_path: Path) -> None:
    config = load_config(None, ARGS)
    task = resolve_task(config.task, config.task_args)
    first = autobatch(task, config, CPU, cache_dir=tmp_path)
    again = autobatch(task, config, CPU, cache_dir=tmp_path)
    assert not first.cache_hit and again.cache_hit
    assert (again.probe_steps, again.verify_steps, again.throughput_steps) == (0, 1, 0)
    assert again.chosen == first.chosen and again.fingerprint == first.fingerprint
    other = load_config(None, [*ARGS[:-1], "memory.budget=3MiB"])
    assert not autobatch(task, other, CPU, cache_dir=tmp_path,
                         measure_throughput=False).cache_hit


@pytest.mark.slow
def test_knee_and_effective_batch_with_accumulation(tmp_path: Path) -> None:
    config = load_config(None, [*ARGS, "train.effective_batch_size=1000"])
    task = resolve_task(config.task, config.task_args)
    r = autobatch(task, config, CPU, cache_dir=tmp_path)
    assert r.chosen <= r.max_fit < 1000
    scanned = {t.size: t.samples_per_s for t in r.trials if t.kind == "scan"}
    assert list(scanned)[:3] == [1, 2, 4]  # the knee can lie below 8
    timed = [t for t in r.trials if t.kind == "throughput"]
    assert [t.size for t in timed] == near_the_best(scanned)  # timed again: those near the top
    # with ROUNDS = 3 a trial keeps every round (min, median, max): the knee is decided on them
    rounds = {t.size: [t.spread[0], t.samples_per_s, t.spread[1]] for t in timed}
    assert choose_knee(rounds) == (r.chosen, pytest.approx(r.knee_tolerance))
    assert r.effective_batch_size == 1000
    assert r.accumulation_steps * r.chosen >= 1000 > (r.accumulation_steps - 1) * r.chosen
    assert r.lr == config.train.lr  # the effective batch did not change: neither does lr


@pytest.mark.parametrize(("rule", "expected"), [("none", 1e-3), ("linear", 4e-3),
                                                ("sqrt", 2e-3)])
def test_lr_follows_the_effective_batch(rule: str, expected: float) -> None:
    config = load_config(None, ["train.lr=1e-3", "train.batch_size=auto",
                                "train.lr_reference_batch=16", f"train.lr_scaling={rule}"])
    assert scaled_lr(config, 64) == pytest.approx(expected)
    assert scaled_lr(config, 16) == pytest.approx(1e-3)


@pytest.mark.slow
def test_without_a_budget_a_cpu_search_stays_within_the_memory_available(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU, memory past what is free does not raise: the kernel kills the process.
    So the search bounds itself by a share of the memory available when it starts."""
    from redline.memory import probe

    available = 4 * 2**20
    monkeypatch.setattr(probe, "available_memory", lambda: available)
    config = load_config(None, ARGS[:-1])  # no memory.budget
    task = resolve_task(config.task, config.task_args)
    said: list[str] = []
    r = autobatch(task, config, CPU, cache_dir=tmp_path, progress=said.append)
    assert r.budget_bytes == int(probe.AVAILABLE_SHARE * available) < available
    assert "available" in r.budget_source and any("available" in s for s in said)
    assert all(t.peak_bytes is None or t.peak_bytes <= r.budget_bytes for t in r.trials)
    assert _peak_at(r.max_fit) <= r.target_bytes < r.budget_bytes


@pytest.mark.slow
def test_without_a_budget_the_guard_checks_new_sizes_against_the_memory_available(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from redline.memory import probe
    from redline.run.trainer import Trainer
    from redline.telemetry.jsonl import read_jsonl

    # room for a micro-batch of 32, not 64 (the tracker's count is what the check uses)
    available = int((_peak_at(32) + _peak_at(64)) / 2 / probe.AVAILABLE_SHARE)
    monkeypatch.setattr(probe, "available_memory", lambda: available)
    config = load_config(None, [*ARGS[:-1], "train.batch_size=64", "train.steps=3",
                                "train.eval_every=0", "memory.grow_after=0"])
    result = Trainer(config, run_dir=tmp_path / "r", progress=False).fit()
    assert result.steps == 3 and result.samples == 3 * 64
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    changes = [(e["old"], e["new"], e["step"]) for e in events if e["event"] == "micro_batch"]
    assert changes == [(64, 32, 1)]
    limit = next(e for e in events if e["event"] == "memory_limit")
    assert limit["bytes"] == int(probe.AVAILABLE_SHARE * available)


def test_the_knee_decides_only_beyond_the_timing_noise() -> None:
    # 8 is 10 % slower than 16 with 1 % noise: 16 wins
    clear = {8: [90.0, 91.0, 89.5], 16: [100.0, 101.0, 99.0], 32: [99.5, 100.5, 99.0]}
    assert choose_knee(clear)[0] == 16
    # under load the rounds spread by ~15 %: 8's 6 % deficit is noise, the smallest wins
    noisy = {8: [80.0, 94.0, 88.0], 16: [85.0, 100.0, 92.0], 32: [84.0, 99.0, 93.0]}
    size, tolerance = choose_knee(noisy)
    assert size == 8 and tolerance > 0.1
    # the same measurements give the same recipe
    assert choose_knee(dict(reversed(list(noisy.items())))) == (size, tolerance)


@pytest.mark.slow
def test_a_cached_search_never_replaces_the_users_lr(tmp_path: Path) -> None:
    config = load_config(None, ARGS)
    task = resolve_task(config.task, config.task_args)
    autobatch(task, config, CPU, cache_dir=tmp_path, measure_throughput=False)
    mine = load_config(None, [*ARGS, "train.lr=1e-3"])
    again = autobatch(task, mine, CPU, cache_dir=tmp_path, measure_throughput=False)
    assert again.cache_hit and again.lr == 1e-3  # the measurement is cached, not the recipe
    assert again.apply(mine).train.lr == 1e-3
    kept = load_config(None, [*ARGS, "train.effective_batch_size=512", "train.lr=1e-3",
                              "train.lr_scaling=linear"])
    r = autobatch(task, kept, CPU, cache_dir=tmp_path, measure_throughput=False)
    assert r.effective_batch_size == 512 and r.lr == 1e-3  # kept: nothing to rescale
    assert r.accumulation_steps * r.chosen >= 512


def test_auto_with_an_lr_rule_needs_the_batch_lr_was_tuned_for() -> None:
    from redline.config import ConfigError

    with pytest.raises(ConfigError, match="lr_reference_batch"):
        load_config(None, ["train.batch_size=auto", "train.lr_scaling=sqrt"])
    load_config(None, ["train.batch_size=auto", "train.lr_scaling=sqrt",
                       "train.lr_reference_batch=32"])


def _speeds(monkeypatch: pytest.MonkeyPatch, speed: Callable[[int], float],
            time_left: float | None = None) -> list[int]:
    """The batch search's scan sees `speed(size)` samples/s (and `time_left` seconds left
    under a deadline) instead of the clock's: its steps still run (memory checks
    included), only the numbers its stop rules decide on are given. Returns the sizes the
    scan measured, in order."""
    measured: list[int] = []

    def given(sizes: list[int], measure: Callable[[int], float | None], say: Callable[[str], None],
              left: Callable[[], float] | None = None) -> dict[int, float]:
        def rate(s: int) -> float | None:
            measured.append(s)
            return None if measure(s) is None else speed(s)
        return knee.scan(sizes, rate, say, None if left is None or time_left is None
                         else lambda: time_left)

    monkeypatch.setattr(batchsearch, "scan", given)
    return measured


# samples/s: rising to 8, falling past it (per sample c/n + K*n)
PEAKS_AT_8 = {1: 100.0, 2: 180.0, 4: 300.0, 8: 400.0, 16: 380.0, 32: 300.0, 64: 200.0,
              128: 100.0, 256: 50.0}


def test_the_knee_scan_stops_once_two_sizes_in_a_row_are_clearly_slower() -> None:
    said: list[str] = []
    scanned = knee.scan(sorted(PEAKS_AT_8), PEAKS_AT_8.get, said.append)
    assert list(scanned) == [1, 2, 4, 8, 16, 32, 64]  # 32 and 64: both over FALLEN below 8
    assert said[-1] == "scanning micro-batch 64"
    assert near_the_best(scanned) == [8, 16]  # within NEAR of the best: timed in rounds
    assert choose_knee({8: [400.0, 402.0, 398.0], 16: [380.0, 382.0, 379.0]})[0] == 8
    one_fall = {**PEAKS_AT_8, 64: 420.0}  # 32 fell, 64 did not (a new best): the scan goes on
    assert 128 in knee.scan(sorted(one_fall), one_fall.get, said.append)


def test_the_knee_scan_stops_after_three_doublings_without_gain_or_at_a_misfit() -> None:
    flat = {s: 100.0 + s / 100 for s in (1, 2, 4, 8, 16, 32, 64)}  # gains well under 2 %
    assert list(knee.scan(sorted(flat), flat.get, lambda _: None)) == [1, 2, 4, 8, 16]
    rising = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0}
    fits = lambda s: None if s > 4 else rising[s]  # noqa: E731 - 8 does not fit
    assert list(knee.scan(sorted(rising), fits, lambda _: None)) == [1, 2, 4]


# 16 ms a step up to 16 samples, then 20 ms a sample: samples/s falls by 97 % at 32
FALLS_PAST_16 = {s: s / (0.016 if s <= 16 else 0.02 * s) for s in (1, 2, 4, 8, 16, 32, 64)}


def test_under_a_deadline_a_costly_size_after_a_fall_is_not_scanned() -> None:
    """One size slower than the best, and the next would take over a quarter of the time
    left: the scan stops there (without a deadline, two clear falls are needed)."""
    said: list[str] = []
    scanned = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: 8.0)
    assert list(scanned) == [1, 2, 4, 8, 16, 32]  # 64's two steps: 2.56 s, over 8 s / 4
    assert said[-1].startswith("micro-batch 64 not scanned")
    roomy = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: 60.0)
    assert 64 in roomy  # 2.56 s is under a quarter of 60 s
    free = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append)
    assert 64 in free  # no deadline: two falls
    spent = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: -1.0)
    assert list(spent) == [1, 2, 4]  # the time is spent: the scan ends after three sizes
    assert said[-1] == "the time budget is spent: the scan stops after micro-batch 4"


@pytest.mark.slow
def test_the_search_stops_its_scan_where_the_rules_say_and_chooses_a_timed_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's rules, inside a real search: its steps and memory checks run, on the
    speeds given; which size the real clock then finds fastest is not asserted (it is the
    machine's), only that the choice is one the search timed and verified."""
    measured = _speeds(monkeypatch, PEAKS_AT_8.__getitem__)
    config = load_config(None, [f"task={TOY}", "memory.budget=64MiB",
                                "train.effective_batch_size=256"])
    task = resolve_task(TOY, {"n": 2048, "hidden": 64})
    r = autobatch(task, config, CPU, cache_dir=tmp_path)
    assert measured == [1, 2, 4, 8, 16, 32, 64] and r.max_fit == 256
    assert [t.size for t in r.trials if t.kind == "scan"] == measured
    assert {t.size for t in r.trials if t.kind == "throughput"} == {8, 16}
    assert r.chosen in (8, 16)


@pytest.mark.slow
def test_under_a_deadline_the_search_skips_the_costly_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = _speeds(monkeypatch, FALLS_PAST_16.__getitem__, time_left=8.0)
    config = load_config(None, [f"task={TOY}", "memory.budget=64MiB"])
    said: list[str] = []
    task = resolve_task(TOY, {"n": 2048, "hidden": 64})
    r = autobatch(task, config, CPU, cache_dir=tmp_path, verify_largest=False,
                  deadline=1e12, progress=said.append)  # far away: time_left is given
    assert measured == [1, 2, 4, 8, 16, 32] and r.chosen == 16
    assert any(m.startswith("micro-batch 64 not scanned") for m in said), said


@pytest.mark.slow
def test_the_fastest_only_search_checks_what_it_scans_and_verifies_the_choice(
        tmp_path: Path) -> None:
    """redline tune's search (verify_largest=False): two probes predict the largest size;
    every size the scan reaches beyond them is checked against the budget first, and the
    one chosen is verified with its evaluation batch, so nothing it hands training is
    unverified, and the scan stops at the first size that does not fit."""
    config = load_config(None, ARGS)
    task = resolve_task(config.task, config.task_args)
    r = autobatch(task, config, CPU, cache_dir=tmp_path, verify_largest=False)
    assert r.max_fit_predicted and r.probe_steps == 2
    probed = max(t.size for t in r.trials if t.kind == "probe")
    scanned = {t.size for t in r.trials if t.kind == "scan"}
    checked = {t.size: t for t in r.trials if t.kind == "verify"}
    assert all(s in checked for s in scanned if s > probed)  # tracked before it was timed
    assert all(checked[s].fits for s in scanned if s > probed)
    last = [t for t in r.trials if t.kind == "verify"][-1]
    assert last.size == r.chosen and last.fits  # the choice, with its evaluation batch
    assert _peak_at(r.chosen) <= r.target_bytes
    beyond = [t for t in r.trials if t.kind == "verify" and not t.fits]
    assert all(s < t.size for t in beyond for s in scanned)  # the scan stopped there
    full = autobatch(task, config, CPU, cache_dir=tmp_path)  # its own cache entry
    assert not full.cache_hit and not full.max_fit_predicted


@pytest.mark.slow
def test_the_fastest_only_scan_stops_at_a_size_the_prediction_overestimated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tasks.toy import ToyRegression

    class Quadratic(ToyRegression):  # memory grows with the batch's square: the fit errs
        def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
            x = batch[0]
            pairs = (x @ x.T).unsqueeze(-1).expand(-1, -1, 16).contiguous()
            return super().loss(model, batch) + 0 * pairs.mean()

    # samples/s doubling with each doubling: the scan climbs until a size does not fit
    _speeds(monkeypatch, float)
    config = load_config(None, ARGS)
    r = autobatch(Quadratic(n=2048, hidden=512), config, CPU, cache_dir=tmp_path,
                  verify_largest=False)
    misfit = [t for t in r.trials if t.kind == "verify" and not t.fits]
    assert misfit and misfit[0].size <= r.max_fit  # predicted to fit; it did not
    assert max(t.size for t in r.trials if t.kind == "scan") < misfit[0].size
    assert r.chosen < misfit[0].size and r.trials[-1].fits  # a size that was verified


def _rounds(rate: float, spread: float = 0.0) -> Timing:
    return Timing([rate * (1 - spread / 2), rate, rate * (1 + spread / 2)])


@pytest.mark.parametrize(("eager", "fast", "compile_s", "steps", "verdict"), [
    # 16 samples a step: 0.16 s eager, 0.08 s compiled; 1000 steps save 80 s
    (_rounds(100.0), _rounds(200.0), 10.0, 1000, "on: compiled +100.0% samples/s, "
     "compile 10.0 s, saving 80.0 s over train.steps 1000"),
    (_rounds(100.0), _rounds(200.0), 100.0, 1000, "off: compiled +100.0% samples/s, compile "
     "100.0 s, saving 80.0 s over train.steps 1000 (the run is too short to repay the "
     "compile)"),
    (_rounds(100.0), _rounds(200.0), 10.0, 100, "the run is too short"),  # 8 s saved
    (_rounds(100.0), _rounds(101.0), 0.0, 1000, "(within the noise)"),  # 1 %: under 2 %
    (_rounds(100.0, 0.3), _rounds(110.0, 0.3), 0.0, 10**6, "(within the noise)"),
])
def test_compile_is_adopted_when_its_measured_saving_repays_the_compile(
        eager: Timing, fast: Timing, compile_s: float, steps: int, verdict: str) -> None:
    from redline.tuning.compile_choice import compile_decision
    from redline.tuning.tune_report import TuneReport

    config = load_config(None, ["train.batch_size=16", f"train.steps={steps}"])
    compiled = config.updated({"precision.compile": True})
    report = TuneReport(start={}, tuned={})
    chosen = compile_decision(config, compiled, [eager, fast], compile_s, report)
    assert (chosen is compiled) == verdict.startswith("on")
    assert verdict in report.reasons["compile"]
    assert [r.setting for r in report.rows] == ["eager", "compiled"]
