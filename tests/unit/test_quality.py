"""The precision screen (precision_screen.py) and the loader choice (loader_choice.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.tuning.loader_choice import (
    choose_pinning,
    choose_workers,
    keep_zero_workers,
    resolve_auto_workers,
    worker_counts,
)
from redline.tuning.precision_screen import (
    SLOWER,
    SPEED_STEPS,
    StepTime,
    candidates,
    check_precisions,
)
from redline.tuning.trial import Timing
from tests.tasks.speedy import Constructed

CPU = DeviceInfo.detect("cpu")


def _times(**seconds: float) -> StepTime:
    """A step_time giving each run its constant step time (default 0.01 s): the speed
    rules decide on these numbers, not on the machine's clock."""
    return lambda run, _measured: seconds.get(run.replace("-", "_"), 0.01)


def _config() -> RunConfig:
    return RunConfig(task="x").updated({"train.batch_size": 16})


@pytest.mark.slow
def test_a_precision_that_breaks_training_is_excluded_with_the_number() -> None:
    checks = {c.name: c for c in check_precisions(Constructed(per_sample_ms=0.0), _config(), CPU,
                                                  ["fp16-mixed", "bf16-mixed"], steps=12,
                                                  step_time=_times())}
    assert checks["fp32"].admitted and checks["fp32"].loss is not None
    assert not checks["fp16-mixed"].admitted and checks["fp16-mixed"].loss is None
    assert "not finite" in checks["fp16-mixed"].reason
    assert checks["bf16-mixed"].admitted, checks["bf16-mixed"].reason
    assert "against fp32's" in checks["bf16-mixed"].reason  # the number, and the band


def test_a_precision_far_slower_in_its_first_step_is_dropped_unchecked() -> None:
    task = Constructed(per_sample_ms=0.0)
    checks = {c.name: c for c in check_precisions(task, _config(), CPU, ["fp16-mixed"],
                                                  steps=12, step_time=_times(fp16_mixed=0.4))}
    fp16 = checks["fp16-mixed"]  # 40x fp32's step: over SLOWER
    assert not fp16.admitted and "too slow" in fp16.reason and "40x" in fp16.reason
    assert fp16.loss is None  # no quality verdict was made
    assert checks["fp32"].admitted


@pytest.mark.slow
def test_a_precision_slower_but_within_the_first_step_rule_is_checked() -> None:
    task = Constructed(per_sample_ms=0.0)
    slower = 0.01 * SLOWER * 0.9  # just under SLOWER times fp32's step
    checks = {c.name: c for c in check_precisions(task, _config(), CPU, ["bf16-mixed"],
                                                  steps=12, step_time=_times(bf16_mixed=slower))}
    bf16 = checks["bf16-mixed"]
    assert bf16.loss is not None and "too slow" not in bf16.reason  # the quality check ran
    assert bf16.speed_vs_fp32 == pytest.approx(1 / (SLOWER * 0.9))


def test_candidates_name_why_a_precision_is_not_tried() -> None:
    runs, not_run = candidates(CPU)
    assert "fp32" not in runs and "bf16-mixed" in runs
    assert "emulation" in not_run["fp8-emulated"] and "CUDA" in not_run["fp8"]


def test_worker_counts_leave_a_core_for_the_step() -> None:
    assert worker_counts(0) == [0] and worker_counts(3) == [0, 1, 2]
    assert worker_counts(8) == [0, 1, 2, 4, 8]


def test_a_resumed_run_keeps_the_loader_its_first_start_measured(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"data": {"num_workers": 3, "prefetch_factor": 4,
                                              "pin_memory": "auto"}}))
    config = _config().updated({"data.num_workers": "auto"})
    resolved, record = resolve_auto_workers(Constructed(), config, CPU, main=False,
                                            saved=saved)
    assert resolved.data.num_workers == 3 and resolved.data.prefetch_factor == 4
    assert record["source"] == str(saved)
    assert resolve_auto_workers(Constructed(), _config(), CPU)[1] == {}  # not auto: as is


@pytest.mark.slow
def test_with_a_least_speed_a_format_too_slow_to_be_chosen_is_not_checked() -> None:
    """fp32 is always admitted, so a format far slower than it cannot win: its first steps
    drop it, and when it was the only candidate the check ends there."""
    said: list[str] = []
    task = Constructed(per_sample_ms=0.0)
    half = _times(bf16_mixed=0.02)  # 0.5x fp32's samples/s: slower, yet not SLOWER
    checks = {c.name: c for c in check_precisions(task, _config(), CPU, ["bf16-mixed"],
                                                  steps=30, say=said.append,
                                                  least_speed=0.675, step_time=half)}
    assert said[-1].startswith(f"quality check: step {SPEED_STEPS + 1} of 30")  # ended there
    bf16 = checks["bf16-mixed"]
    assert not bf16.admitted and bf16.loss is None and "too slow to be chosen" in bf16.reason
    assert bf16.speed_vs_fp32 == pytest.approx(0.5) and "0.50x" in bf16.reason
    assert checks["fp32"].admitted
    kept = {c.name: c for c in check_precisions(task, _config(), CPU, ["bf16-mixed"],
                                                steps=12, step_time=half)}
    assert kept["bf16-mixed"].loss is not None  # without least_speed: checked, as before
    close = _times(bf16_mixed=0.01 / 0.7)  # 0.7x: above least_speed, so checked
    near = {c.name: c for c in check_precisions(task, _config(), CPU, ["bf16-mixed"],
                                                steps=12, least_speed=0.675, step_time=close)}
    assert near["bf16-mixed"].loss is not None and near["bf16-mixed"].admitted


def _timing(rate: float, spread: float = 0.0, wait: float = 0.0) -> Timing:
    """Three rounds at `rate` samples/s, spread by `spread` of it, waiting `wait` for data."""
    return Timing([rate * (1 - spread / 2), rate, rate * (1 + spread / 2)], [wait] * 3)


def test_workers_are_not_timed_where_the_step_barely_waits_for_data_or_on_one_core() -> None:
    assert "waits 1.0% of its time" in keep_zero_workers(_timing(100.0, wait=0.01), 4)
    assert "one core" in keep_zero_workers(_timing(100.0, wait=0.5), 1)
    assert keep_zero_workers(_timing(100.0, wait=0.5), 4) is None  # worth timing


def test_the_fewest_workers_within_the_noise_of_the_fastest_are_chosen() -> None:
    options = [{"num_workers": 0}, {"num_workers": 1}, {"num_workers": 2},
               {"num_workers": 2, "prefetch_factor": 4}]
    # 1 worker doubles samples/s; 2 are 1 % faster still: inside the 2 % tolerance
    timings = [_timing(100.0, wait=0.5), _timing(200.0), _timing(202.0), _timing(150.0)]
    chosen, rows, why = choose_workers(options, timings)
    assert chosen == {"num_workers": 1} and why.startswith("1 worker: 2.00x")
    assert "2 workers is within the noise of it" in why
    assert [r.samples_per_s for r in rows] == [100.0, 200.0, 202.0, 150.0]
    # rounds spread by 30 %: a 10 % gain is noise, and 0 workers is kept
    noisy = [_timing(100.0, 0.3), _timing(110.0, 0.3), _timing(105.0, 0.3), _timing(90.0, 0.3)]
    chosen, _, why = choose_workers(options, noisy)
    assert chosen == {"num_workers": 0} and "no worker setting is faster" in why
    clear = [_timing(100.0), _timing(120.0), _timing(150.0), _timing(180.0)]
    assert choose_workers(options, clear)[0] == {"num_workers": 2, "prefetch_factor": 4}


def test_pinning_is_on_only_beyond_the_noise() -> None:
    assert choose_pinning(_timing(100.0), _timing(110.0)) == (
        True, "on: pinned +10.0% samples/s (beyond the noise)")
    assert not choose_pinning(_timing(100.0), _timing(101.0))[0]  # inside 2 %
    assert not choose_pinning(_timing(100.0, 0.3), _timing(110.0, 0.3))[0]  # inside the noise
