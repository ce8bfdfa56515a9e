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


HOOKS = Path(__file__).resolve().parents[1] / "tasks" / "hookcases.py"


def test_the_dry_run_batches_with_trainings_loader_and_fails_when_training_would(
        tmp_path: Path) -> None:
    good = run_cli(["train", f"{HOOKS}:GRUTagger", "--dry-run", "--json",
                    "--set", "task_args.eval_sets=2"], tmp_path)
    assert good.returncode == 0, good.stderr
    plan = json.loads(good.stdout.splitlines()[-1])
    assert plan["ok"] and plan["eval_sets"] == ["short", "long"]
    assert "short/accuracy" in plan["eval_metrics"] and "long/loss" in plan["eval_metrics"]

    # without the collate_fn, variable-length samples cannot be batched: the dry run and
    # training stop alike, with one sentence and not redline's loader traceback
    spec = f"{HOOKS}:GRUTaggerNoCollate"
    dry = run_cli(["train", spec, "--dry-run"], tmp_path)
    run = run_cli(["train", spec, "--steps", "5"], tmp_path)
    for out in (dry, run):
        assert out.returncode == 2, out.stderr
        assert "give the task a collate_fn(samples) -> batch" in out.stderr
        assert "stack expects each tensor to be equal size" in out.stderr
        assert "Traceback" not in out.stderr
    assert _files(tmp_path) in ([], ["runs"])  # the failed run left no run directory behind


def test_the_dry_run_shows_the_lr_the_task_optimizer_really_has(tmp_path: Path) -> None:
    out = run_cli(["train", f"{HOOKS}:OneCycleRegression", "--dry-run", "--json",
                   "--steps", "50"], tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.splitlines()[-1])
    assert plan["optimizer"] == "SGD" and plan["scheduler"] == "OneCycleLR"
    assert plan["lr"] == pytest.approx(0.05 / 25)  # where OneCycleLR starts, not train.lr
    assert "task optimizer SGD sets lr 0.05; train.lr 0.0002 is not used" in plan["notes"]
    human = run_cli(["train", f"{HOOKS}:OneCycleRegression", "--dry-run",
                     "--set", "task_args.schedule=false"], tmp_path)
    assert "lr 0.05 (SGD, LambdaLR)" in human.stdout, human.stdout
    assert "note       task optimizer SGD sets lr 0.05" in human.stdout
