"""The precision screen (precision_screen.py) and the loader choice (loader_choice.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.tuning.loader_choice import resolve_auto_workers, worker_counts
from redline.tuning.precision_screen import SPEED_STEPS, candidates, check_precisions
from tests.tasks.speedy import Constructed

CPU = DeviceInfo.detect("cpu")


class SlowerUnder(Constructed):
    """The constructed task, each step under `dtype`'s CPU autocast sleeping `extra_s` more."""

    def __init__(self, dtype: torch.dtype, extra_s: float, per_sample_ms: float) -> None:
        super().__init__(per_sample_ms=per_sample_ms)
        self.dtype, self.extra_s = dtype, extra_s

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == self.dtype:
            time.sleep(self.extra_s)
        return super().loss(model, batch)


def _config() -> RunConfig:
    return RunConfig(task="x").updated({"train.batch_size": 16})


def test_a_precision_that_breaks_training_is_excluded_with_the_number() -> None:
    checks = {c.name: c for c in check_precisions(Constructed(per_sample_ms=0.0), _config(), CPU,
                                                  ["fp16-mixed", "bf16-mixed"], steps=12)}
    assert checks["fp32"].admitted and checks["fp32"].loss is not None
    assert not checks["fp16-mixed"].admitted and checks["fp16-mixed"].loss is None
    assert "not finite" in checks["fp16-mixed"].reason
    assert checks["bf16-mixed"].admitted, checks["bf16-mixed"].reason
    assert "against fp32's" in checks["bf16-mixed"].reason  # the number, and the band


def test_a_precision_far_slower_in_its_first_step_is_dropped_unchecked() -> None:
    slow_half = SlowerUnder(torch.float16, 0.1, per_sample_ms=0.0)  # 40x fp32's step
    checks = {c.name: c for c in check_precisions(slow_half, _config(), CPU,
                                                  ["fp16-mixed"], steps=12)}
    assert not checks["fp16-mixed"].admitted and "too slow" in checks["fp16-mixed"].reason
    assert checks["fp16-mixed"].loss is None  # no quality verdict was made


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


def test_with_a_least_speed_a_format_too_slow_to_be_chosen_is_not_checked() -> None:
    """fp32 is always admitted, so a format far slower than it cannot win: its first steps
    drop it, and when it was the only candidate the check ends there."""
    said: list[str] = []
    # 20 ms more a bf16 step: 0.2-0.4x fp32's speed, yet not 10x slower
    slow_bf16 = SlowerUnder(torch.bfloat16, 0.02, per_sample_ms=0.2)
    checks = {c.name: c for c in check_precisions(slow_bf16, _config(), CPU,
                                                  ["bf16-mixed"], steps=30, say=said.append,
                                                  least_speed=0.675)}
    assert said[-1].startswith(f"quality check: step {SPEED_STEPS + 1} of 30")  # ended there
    bf16 = checks["bf16-mixed"]
    assert not bf16.admitted and bf16.loss is None and "too slow to be chosen" in bf16.reason
    assert bf16.speed_vs_fp32 is not None and bf16.speed_vs_fp32 < 0.675
    assert checks["fp32"].admitted
    kept = {c.name: c for c in check_precisions(slow_bf16, _config(), CPU,
                                                ["bf16-mixed"], steps=12)}
    assert kept["bf16-mixed"].loss is not None  # without least_speed: checked, as before
