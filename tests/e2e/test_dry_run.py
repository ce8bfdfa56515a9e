"""`redline train --dry-run`: everything checked and run once, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_dry_run_steps_once_reports_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--dry-run", "--json", "--steps", "300",
                   "--set", "train.effective_batch_size=32", "--set", "train.batch_size=8"],
                  tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.splitlines()[-1])
    assert plan["ok"] and plan["steps"] == 300 and plan["micro_batch"] == 8
    assert plan["effective_batch"] == 32 and plan["accumulation_steps"] == 4
    assert plan["step_time_s"] > 0 and plan["step_peak_bytes"] > 0
    assert plan["projected_run_s"] == pytest.approx(300 * plan["step_time_s"])
    assert plan["eval_metrics"] == ["loss", "mae"]
    assert _files(tmp_path) == []  # no run directory, no cache, nothing
    human = run_cli(["train", TOY, "--dry-run"], tmp_path)
    assert "a projection" in human.stdout and "ok: the run can start" in human.stdout


def test_a_dry_run_catches_what_would_stop_the_run(tmp_path: Path) -> None:
    bad = run_cli(["train", TOY, "--dry-run", "--set", "train.lr=-1"], tmp_path)
    assert bad.returncode == 2 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr
    nogpu = run_cli(["train", TOY, "--dry-run", "--device", "cuda"], tmp_path)
    assert nogpu.returncode == 1 and "blocker" in nogpu.stdout
    oom = run_cli(["train", TOY, "--dry-run", "--memory-budget", "4KiB", "--json",
                   "--set", "memory.oom_guard=false"], tmp_path)
    assert oom.returncode == 1
    assert "ran out of memory" in json.loads(oom.stdout.splitlines()[-1])["blockers"][0]
    assert _files(tmp_path) == []
