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
# grow_effective_batch: these tests search the memory's largest size, not one under 16
ARGS = [f"task={TOY}", "task_args.n=2048", "task_args.hidden=512",
        "train.grow_effective_batch=true", "memory.budget=2MiB"]


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
    assert r.start == 16 and 16 in scanned  # the start: the default batch size
    timed = [t for t in r.trials if t.kind == "throughput"]
    fallen = {t.size for t in r.trials if t.kind == "confirm"} - {t.size for t in timed}
    # every size scanned is timed again in rounds, but those whose fall rounds confirmed
    assert {t.size for t in timed} == set(scanned) - fallen and r.start in fallen | {
        t.size for t in timed}
    rounds = {t.size: t.rounds for t in timed}
    assert choose_knee(rounds, r.start) == (r.chosen, pytest.approx(r.knee_tolerance))
    assert [row["micro_batch"] for row in r.to_dict()["samples_per_s_table"]] == sorted(
        scanned)
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


def test_growing_the_batch_with_an_lr_rule_needs_the_batch_lr_was_tuned_for() -> None:
    from redline.config import ConfigError

    grow = ["train.batch_size=auto", "train.lr_scaling=sqrt", "train.grow_effective_batch=true"]
    with pytest.raises(ConfigError, match="lr_reference_batch"):
        load_config(None, grow)
    load_config(None, [*grow, "train.lr_reference_batch=32"])
    load_config(None, grow[:2])  # the effective batch is kept: the lr never changes


def _speeds(monkeypatch: pytest.MonkeyPatch, speed: Callable[[int], float],
            time_left: float | None = None) -> list[int]:
    """The batch search's scan sees `speed(size)` samples/s (and `time_left` seconds left
    under a deadline) instead of the clock's: its steps still run (memory checks
    included), only the numbers its stop rules decide on are given. Returns the sizes the
    scan measured, in order."""
    measured: list[int] = []

    def given(sizes: list[int], measure: Callable[[int], float | None], say: Callable[[str], None],
              left: Callable[[], float] | None = None, rounds: knee.Rounds | None = None
              ) -> knee.Scanned:
        def rate(s: int) -> float | None:
            measured.append(s)
            return None if measure(s) is None else speed(s)
        return knee.scan(sizes, rate, say, None if left is None or time_left is None
                         else lambda: time_left, lambda sizes: {s: [speed(s)] * 3
                                                               for s in sizes})

    monkeypatch.setattr(batchsearch, "scan", given)
    return measured


# samples/s: rising to 8, falling past it (per sample c/n + K*n)
PEAKS_AT_8 = {1: 100.0, 2: 180.0, 4: 300.0, 8: 400.0, 16: 380.0, 32: 300.0, 64: 200.0,
              128: 100.0, 256: 50.0}


def test_the_knee_scan_stops_once_two_sizes_in_a_row_are_clearly_slower() -> None:
    said: list[str] = []
    scanned = knee.scan(sorted(PEAKS_AT_8), PEAKS_AT_8.get, said.append)
    assert list(scanned.speeds) == [1, 2, 4, 8, 16, 32, 64]  # 32, 64: both FALLEN below 8
    assert said[-1] == "scanning micro-batch 64"
    assert near_the_best(scanned.speeds) == [8, 16]  # within NEAR of the best
    assert choose_knee({8: [400.0, 402.0, 398.0], 16: [380.0, 382.0, 379.0]})[0] == 8
    one_fall = {**PEAKS_AT_8, 64: 420.0}  # 32 fell, 64 did not (a new best): the scan goes on
    assert 128 in knee.scan(sorted(one_fall), one_fall.get, said.append).speeds


def test_the_knee_scan_goes_on_over_sizes_within_noise_and_stops_at_a_misfit() -> None:
    flat = {s: 100.0 + s / 100 for s in (1, 2, 4, 8, 16, 32, 64)}  # gains well under 2 %
    assert list(knee.scan(sorted(flat), flat.get, lambda _: None).speeds) == sorted(flat)
    rising = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0}
    fits = lambda s: None if s > 4 else rising[s]  # noqa: E731 - 8 does not fit
    assert list(knee.scan(sorted(rising), fits, lambda _: None).speeds) == [1, 2, 4]


def test_a_size_the_model_cannot_train_at_is_skipped_and_the_scan_goes_on() -> None:
    """BatchNorm refuses one value per channel: micro-batch 1 fails where larger ran."""
    rising = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0}

    def measure(s: int) -> float:
        if s == 1:
            raise knee.SizeFails("ValueError: Expected more than 1 value per channel")
        return rising[s]

    said: list[str] = []
    scanned = knee.scan(sorted(rising), measure, said.append)
    assert list(scanned.speeds) == [2, 4, 8]
    assert list(scanned.failed) == [1]
    assert any("micro-batch 1 skipped: the model cannot train at it" in m for m in said)


# 16 ms a step up to 16 samples, then 20 ms a sample: samples/s falls by 97 % at 32
FALLS_PAST_16 = {s: s / (0.016 if s <= 16 else 0.02 * s) for s in (1, 2, 4, 8, 16, 32, 64)}


def test_under_a_deadline_a_costly_size_after_a_fall_is_not_scanned() -> None:
    """One size slower than the best, and the next would take over a quarter of the time
    left: the scan stops there (without a deadline, two clear falls are needed)."""
    said: list[str] = []
    scanned = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: 8.0)
    assert list(scanned.speeds) == [1, 2, 4, 8, 16, 32]  # 64's two steps: 2.56 s > 8 s / 4
    assert said[-1].startswith("micro-batch 64 not scanned")
    roomy = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: 60.0)
    assert 64 in roomy.speeds  # 2.56 s is under a quarter of 60 s
    free = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append)
    assert 64 in free.speeds  # no deadline: two falls
    spent = knee.scan(sorted(FALLS_PAST_16), FALLS_PAST_16.get, said.append, lambda: -1.0)
    assert list(spent.speeds) == [1, 2, 4]  # the time is spent: it ends after three sizes
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
    # 32 and 64 fell, confirmed in rounds (with 8); the rest, the start 16 among them,
    # are timed again in rounds and the choice is one of them
    assert {t.size for t in r.trials if t.kind == "confirm"} == {8, 32, 64}
    assert {t.size for t in r.trials if t.kind == "throughput"} == {1, 2, 4, 8, 16}
    assert r.start == 16 and r.chosen in (1, 2, 4, 8, 16) and r.why


@pytest.mark.slow
def test_under_a_deadline_the_search_skips_the_costly_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = _speeds(monkeypatch, FALLS_PAST_16.__getitem__, time_left=8.0)
    config = load_config(None, [f"task={TOY}", "memory.budget=64MiB",
                                "train.grow_effective_batch=true"])
    said: list[str] = []
    task = resolve_task(TOY, {"n": 2048, "hidden": 64})
    r = autobatch(task, config, CPU, cache_dir=tmp_path, verify_largest=False,
                  deadline=1e12, progress=said.append)  # far away: time_left is given
    assert measured == [1, 2, 4, 8, 16, 32] and r.chosen in measured
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


# --- issue 19: the start is the default, the recipe is the user's, budgets are kept ---

def test_a_setting_is_adopted_only_when_faster_than_the_start_beyond_the_noise() -> None:
    from redline.judge import faster_than_start

    quiet_win = [[100.0, 101.0, 99.0], [130.0, 131.0, 129.0]]  # +30 % with 2 % spread
    assert faster_than_start(quiet_win, 0)[0] == 1
    small_gain = [[100.0, 101.0, 99.0], [101.5, 102.0, 101.0]]  # +1.5 %: under 2 %
    assert faster_than_start(small_gain, 0)[0] == 0
    loaded = [[60.0, 100.0, 80.0], [75.0, 120.0, 95.0]]  # +19 % inside a ~50 % spread
    pick, tolerance = faster_than_start(loaded, 0)
    assert pick == 0 and tolerance > 0.4  # a loaded machine keeps the start
    # the first (preferred) of those beating the start, within the noise of the best
    three = [[100.0] * 3, [150.0, 151.0, 149.0], [152.0, 153.0, 151.0]]
    assert faster_than_start(three, 0)[0] == 1
    assert faster_than_start([[150.0] * 3, [100.0] * 3], 1)[0] == 0  # start 1 is beaten
    # noise over 100 %: "within the noise of the best" is a ratio, not a difference, so
    # the first size past the start does not win on a tolerance that swallows the best
    wild = [[11.0, 3.0, 30.0], [50.0, 4.0, 120.0], [540.0, 300.0, 800.0], [670.0, 400.0, 900.0]]
    assert faster_than_start(wild, 0) == (2, pytest.approx(1.0, rel=1.0))


def test_rates_all_within_noise_keep_the_start_whatever_size_measured_best() -> None:
    # the observed load: 1 looked fastest on one timing; in rounds all overlap
    rounds = {1: [17.0, 4.0, 30.0], 2: [8.0, 20.0, 35.0], 4: [12.0, 40.0, 25.0],
              8: [20.0, 35.0, 18.0], 16: [30.0, 22.0, 15.0]}
    assert choose_knee(rounds, 16)[0] == 16
    # quiet, 8 clearly faster than the start 16: adopted; the smallest within noise of it
    quiet = {4: [50.0, 51.0, 50.5], 8: [120.0, 121.0, 119.5], 16: [100.0, 100.5, 99.5]}
    assert choose_knee(quiet, 16)[0] == 8
    assert choose_knee(quiet)[0] == 8  # no start: the smallest within noise of the best


def test_one_bad_timing_at_a_small_size_does_not_stop_the_scan() -> None:
    """1 and 2 were timed while the machine was busy: on single timings 2 and 4 look
    clearly slower than 1, so the rounds are asked, and they show no fall: it goes on."""
    true = {1: 10.0, 2: 19.0, 4: 36.0, 8: 60.0, 16: 80.0, 32: 85.0}
    once = {**true, 1: 50.0, 2: 19.0, 4: 36.0}  # 1 mis-measured high once
    asked: list[list[int]] = []

    def rounds(sizes: list[int]) -> dict[int, list[float]]:
        asked.append(sizes)
        return {s: [true[s] * 0.98, true[s], true[s] * 1.02] for s in sizes}

    said: list[str] = []
    scanned = knee.scan(sorted(true), once.get, said.append, rounds=rounds)
    assert asked == [[1, 2, 4]] and list(scanned.speeds) == sorted(true)
    assert not scanned.fallen and scanned.speeds[1] == 10.0  # corrected by its rounds
    # a fall the rounds confirm does stop it
    falls = {1: 10.0, 2: 40.0, 4: 100.0, 8: 60.0, 16: 50.0, 32: 40.0}
    stopped = knee.scan(sorted(falls), falls.get, said.append,
                        rounds=lambda sizes: {s: [falls[s]] * 3 for s in sizes})
    assert list(stopped.speeds) == [1, 2, 4, 8, 16] and stopped.fallen == [8, 16]
    assert "beyond the noise" in stopped.stop


def test_a_size_timed_once_is_timed_again_before_it_is_excluded() -> None:
    scanned = knee.Scanned(speeds={1: 5.0, 2: 60.0, 4: 100.0, 8: 101.0, 16: 98.0},
                           fallen=[])
    assert knee.to_time_in_rounds(scanned, 16) == [1, 2, 4, 8, 16]  # 1 and 2 again too
    scanned.fallen = [16]  # confirmed in rounds: not again; the start always is
    assert knee.to_time_in_rounds(scanned, 16) == [1, 2, 4, 8, 16]
    assert knee.to_time_in_rounds(scanned, 4) == [1, 2, 4, 8]
    # under a deadline: the start and the best first, the rest while the rounds fit
    tight = knee.to_time_in_rounds(scanned, 4, time_left=1.0, round_s=0.1,
                                   step_s=lambda s: 0.01)
    assert tight == [2, 4, 8]  # 3 rounds of 0.1 s each: 2 is the cheapest of the rest
    assert knee.to_time_in_rounds(scanned, 4, 0.0, 0.1, lambda s: 0.01) == [4, 8]
    # the start is the best: listed once, and the size near it joins it
    assert knee.to_time_in_rounds(scanned, 8, 0.0, 0.1, lambda s: 0.01) == [4, 8]


@pytest.mark.parametrize(("extra", "micro", "effective", "accumulation", "lr"), [
    ([], 4, 16, 4, 1e-3),  # unset: the default batch 16 kept, 4 x 4
    ([], 64, 16, 1, 1e-3),  # a micro-batch never exceeds the effective batch
    # kept, accumulation covers it (lr follows the user's own reference batch 16 -> 24)
    (["train.effective_batch_size=24"], 16, 24, 2, 1.5e-3),
    (["train.grow_effective_batch=true"], 64, 64, 1, 4e-3),  # opt-in: grows, lr linear
    (["train.grow_effective_batch=true"], 4, 16, 4, 1e-3),  # it never shrinks
])
def test_auto_keeps_the_effective_batch_unless_growing_is_asked(
        extra: list[str], micro: int, effective: int, accumulation: int, lr: float) -> None:
    from redline.tuning.recipe import recipe

    config = load_config(None, ["train.batch_size=auto", "train.lr=1e-3",
                                "train.lr_scaling=linear", "train.lr_reference_batch=16",
                                *extra])
    r = recipe(config, micro, None)
    assert (r.micro_batch * r.accumulation_steps >= r.effective_batch_size)
    assert (r.micro_batch, r.effective_batch_size, r.accumulation_steps) == (
        min(micro, effective), effective, accumulation)
    assert r.lr == pytest.approx(lr)
    line = r.describe(config)
    if extra and "grow" in extra[0] and micro > 16:
        assert "16 -> 64" in line and "train.lr 0.001 -> 0.004" in line
    else:
        assert f"effective batch {effective} kept" in line


@pytest.mark.parametrize(("start", "tuned", "written"), [
    ([35.0, 36.0, 34.0, 35.5, 35.0], [1.6, 1.7, 1.5, 1.6, 1.6], "start"),  # observed: 0.05x
    ([100.0, 101.0, 99.0, 100.0, 100.5], [101.0, 100.0, 102.0, 101.0, 100.0], "start"),
    ([100.0, 101.0, 99.0, 100.0, 100.5], [150.0, 151.0, 149.0, 150.0, 150.5], "tuned"),
])
def test_tune_writes_the_start_unless_its_final_timing_is_faster_beyond_noise(
        start: list[float], tuned: list[float], written: str) -> None:
    from redline.tuning.tune import keep_start

    why = keep_start(start, tuned)
    assert (why is None) == (written == "tuned")
    if why:
        assert "not faster beyond the noise" in why


def test_compile_that_cannot_fit_the_budget_is_skipped_with_its_prediction() -> None:
    from redline.tuning.compile_choice import choose_compile, predict_compile_s
    from redline.tuning.tune_report import Clock, TuneReport

    config = load_config(None, ["train.batch_size=16", "train.steps=10000000"])
    report = TuneReport(start={}, tuned={})
    chosen = choose_compile(None, config, CPU, ("compile",), Clock(60.0), report,  # type: ignore[arg-type]
                            lambda _: None, rounds=3, min_s=0.3, reserve_s=5.0,
                            predicted=(115.0, "given"))
    assert chosen is config  # nothing compiled, nothing built
    why = report.reasons["compile"]
    assert why.startswith("off, not tried: compiling and timing it would take about")
    assert "the compile 115 s, given" in why and "for the final timing" in why
    from tests.tasks.tunecases import ManyModules

    seconds, how = predict_compile_s(ManyModules(layers=150), load=2.0)
    assert seconds == pytest.approx(151 * 1.0 * 2.0) and "151 modules" in how


def test_loader_keeps_the_users_workers_unless_beaten_beyond_noise() -> None:
    from redline.tuning.loader_choice import choose_workers

    options = [{"num_workers": 2}, {"num_workers": 0}, {"num_workers": 1}]
    tie = [_rounds(100.0, 0.1), _rounds(104.0, 0.1), _rounds(103.0, 0.1)]
    chosen, rows, why = choose_workers(options, tie)
    assert chosen == {"num_workers": 2} and why.startswith("2 (the start)")
    assert [r.rounds for r in rows] == [t.rates for t in tie]
    win = [_rounds(100.0), _rounds(60.0), _rounds(150.0)]
    assert choose_workers(options, win)[0] == {"num_workers": 1}


def test_a_tuned_config_that_trains_as_the_start_does_is_not_timed_against_it() -> None:
    """The loader stage spells out what "auto" resolves to; timing that against the start
    measures only noise (a loaded machine once showed it at 1.60x), so it is the start."""
    from redline.tuning.tune import runs_alike

    start = load_config(None, ["train.batch_size=16"])
    spelled = start.updated({"data.num_workers": 0, "data.pin_memory": False,
                             "data.persistent_workers": False,
                             "train.effective_batch_size": 16, "train.lr_reference_batch": 16})
    assert runs_alike(start, spelled, CPU)
    assert not runs_alike(start, spelled.updated({"train.batch_size": 8}), CPU)
    assert not runs_alike(start, spelled.updated({"data.num_workers": 1}), CPU)


def test_a_quality_check_whose_first_step_would_overrun_its_share_is_not_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a tracked CPU budget a model the memory plan had to fit steps slowly: one
    # lockstep step of the check (fp32 twice, each format once) cannot stop midway, and
    # one took 159 s of a 90 s tune. The plan's measured seconds per sample predict it.
    from redline.memory.levers import Levers
    from redline.tuning import tune as tune_module
    from redline.tuning.memory_plan import MemoryPlan

    def plan_memory(task: object, config: object, device: object, **kwargs: object
                    ) -> MemoryPlan:
        return MemoryPlan(Levers(), 16, 2**30, 2**29, 0, 0, 16, "given", [], {}, [],
                          sample_s=0.5)  # 16 samples a step: 8 s a run

    def check_precisions(*args: object, **kwargs: object) -> None:
        raise AssertionError("the quality check must not start")

    monkeypatch.setattr(tune_module, "plan_memory", plan_memory)
    monkeypatch.setattr(tune_module, "check_precisions", check_precisions)
    config = load_config(None, [f"task={TOY}", "train.batch_size=16"])
    _, report = tune_module.tune(None, config, CPU, budget_s=60.0,  # type: ignore[arg-type]
                                 factors=("memory", "precision"))
    excluded = [r for r in report.rows if r.factor == "precision" and r.note.startswith(
        "excluded: not checked: one step of its")]
    assert excluded and all("more than the check's share of --budget-s (18 s)" in r.note
                            for r in excluded)
    assert report.tuned["precision"]["name"] == "fp32"


def test_no_batch_search_starts_once_the_budget_left_is_what_later_stages_need(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the search's probes cannot stop mid-step: under a tracked CPU budget they ran a
    # 120 s tune to 415 s once the budget was already spent
    from redline.tuning import tune as tune_module

    def autobatch(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batch search must not start")

    monkeypatch.setattr(tune_module, "autobatch", autobatch)
    config = load_config(None, [f"task={TOY}", "train.batch_size=16"])
    _, report = tune_module.tune(None, config, CPU, budget_s=60.0,  # type: ignore[arg-type]
                                 factors=("batch",), spent_s=55.0)
    rows = [r for r in report.rows if r.factor == "batch"]
    assert rows and rows[0].note.startswith("no batch search: 5 s of --budget-s left")
    assert report.tuned["train"]["batch_size"] == 16  # the start
