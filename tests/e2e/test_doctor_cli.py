"""Doctor's advice and fp16's scaler on real runs from the command line (issue 19, case 7).

The tasks are tests/tasks/doctorcases.py: a gradient that is inf at every loss scale under
fp16-mixed, and a step whose speed peaks at micro-batch 4 while every size fits memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

CASES = ROOT / "tests" / "tasks" / "doctorcases.py"


def test_fp16_that_skips_every_update_warns_and_stops_non_zero(tmp_path: Path) -> None:
    """Case 7: a 200-step fp16 run whose scaler skips its updates used to print nothing
    and exit 0; now it warns once more than half of 20 steps were skipped, and the skips
    count toward train.nonfinite_patience, so it stops with a sentence and exit 1."""
    out = run_cli(["train", f"{CASES}:InfGradient", "--precision", "fp16-mixed", "--steps",
                   "200", "--run-dir", "r", "--no-progress", "--no-report"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("redline: warning: fp16's loss scaler skipped") == 1
    assert "use bf16-mixed" in out.stderr and "learning rate" in out.stderr
    assert "updates in a row" in out.stderr and "Traceback" not in out.stderr
    failed = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["event"] == "failed"]
    assert failed and failed[-1]["error"] == "RunStopped" and failed[-1]["step"] < 200


def test_fp16_start_up_calibration_trains_on_silently(tmp_path: Path) -> None:
    """The scaler's first 7 skips while it halves from 65536 are not the warning."""
    out = run_cli(["train", f"{CASES}:Calibrating", "--precision", "fp16-mixed", "--steps",
                   "40", "--run-dir", "r", "--no-progress", "--no-report"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "loss scaler" not in out.stderr
    doctor = run_cli(["doctor", "r"], tmp_path)  # nor is it doctor's "switch to bf16"
    assert doctor.returncode == 0 and "loss scaler" not in doctor.stdout, doctor.stdout


def test_doctor_does_not_ask_for_memory_target_after_a_search_that_chose_for_speed(
        tmp_path: Path) -> None:
    """Case 7: after `--batch-size auto` chose a size below the largest that fits (for
    speed), doctor said "raise memory.target to let the batch search try larger sizes"."""
    out = run_cli(["train", f"{CASES}:SpeedKnee", "--batch-size", "auto", "--steps", "20",
                   "--run-dir", "r", "--no-progress", "--no-report"], tmp_path,
                  env={"REDLINE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    search = next(e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
                  if e["event"] == "autobatch")
    # every size up to the task's 64 samples fits in a few MiB: memory stopped nothing
    assert search["micro_batch"] <= search["max_fit"] <= 64
    doctor = run_cli(["doctor", "r"], tmp_path)
    assert doctor.returncode == 0, doctor.stderr
    assert "memory.target" not in doctor.stdout, doctor.stdout
