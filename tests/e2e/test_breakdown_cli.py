"""The memory breakdown through the CLI: the dry run measures the steady state (issue 20's
observed case (a): a budget between the first and the second step's peak), an OOM at one
sample says where the memory went and which lever fits (RUN_DIR/memory.json), and doctor
shows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

TASK = f"{Path(__file__).parents[1] / 'tasks' / 'memgpt.py'}:MemGPT"
# 0.9 M parameters, sequence 512: the first step's peak is ~21 MiB, the steady state's
# (AdamW's state present) ~28 MiB
GPT = [TASK, "--set", "task_args.width=128", "--set", "task_args.seq=512",
       "--batch-size", "1", "--steps", "3", "--memory-budget", "26MiB"]


@pytest.mark.slow
def test_dry_run_finds_the_second_step_over_budget_and_the_lever_that_fits(tmp_path: Path
                                                                           ) -> None:
    dry = run_cli(["train", *GPT, "--dry-run", "--json"], tmp_path)
    assert dry.returncode == 1, dry.stdout + dry.stderr
    plan = json.loads(dry.stdout.strip().splitlines()[-1])
    fit = plan["memory_fit"]
    assert not fit["fits"] and "would fit with" in fit["sentence"]
    assert plan["memory"]["peak"] > 26 * 2**20 and plan["memory"]["optimizer_state"] > 0
    assert any("step 2" in b for b in plan["blockers"])
    # the lever it names trains to the end under the same budget
    flags = fit["sentence"].split("e.g. ")[1].split()
    run = run_cli(["train", *GPT, *flags, "--run-dir", "run", "--no-progress",
                   "--no-report"], tmp_path)
    assert run.returncode == 0, run.stderr


@pytest.mark.slow
def test_oom_at_one_sample_explains_itself_and_doctor_shows_it(tmp_path: Path) -> None:
    run = run_cli(["train", *GPT, "--run-dir", "run", "--no-progress", "--no-report"],
                  tmp_path)
    assert run.returncode == 1
    assert "OutOfMemoryAtMinimum" not in run.stderr
    assert "would fit with: " in run.stderr and "--set memory." in run.stderr
    assert "optimizer state (fp32)" in run.stderr  # the breakdown follows the sentence
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert memory["breakdown"]["micro_batch"] == 1 and memory["fit"]
    doctor = run_cli(["doctor", str(tmp_path / "run")], tmp_path)
    assert "memory.json" in doctor.stdout and "activations layers.0" in doctor.stdout
    doctor_json = json.loads(run_cli(["doctor", str(tmp_path / "run"), "--json"],
                                     tmp_path).stdout.strip().splitlines()[-1])
    assert doctor_json["memory"]["budget"] == 26 * 2**20


@pytest.mark.slow
def test_doctor_without_memory_json_shows_no_breakdown(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    doctor = run_cli(["doctor", str(tmp_path / "run"), "--json"], tmp_path)
    assert "memory" not in json.loads(doctor.stdout.strip().splitlines()[-1])
