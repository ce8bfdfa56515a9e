"""`distributed.strategy: auto` and `redline tune --nproc` as a user meets them (issue 21):
auto picks ddp for a model whose states fit one rank's budget and fsdp for one whose
states do not (WideMLP under a tracked CPU budget, memory.budget: per rank), and says
why; tune --nproc 2 trains the leading strategies on 2 ranks, writes the one measured fastest,
and that config trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from redline.telemetry.jsonl import read_jsonl
from redline.tuning.memory_plan import render_plan

from ..conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # each runs the CLI (a measured step; some, 2 processes)

MLP = f"{ROOT / 'tests' / 'tasks' / 'memgpt.py'}:WideMLP"
# WideMLP's states are 32.4 MiB (2.1 M parameters x 16 bytes); a rank's peak is ~32.5 MiB
# whole and ~22.4 MiB sharded over 2 ranks: 48 MiB fits one rank, 30 MiB (target 25.5)
# fits only sharded.
SETS = ["--set", "train.batch_size=4", "--set", "train.effective_batch_size=8",
        "--set", "distributed.strategy=auto"]
ENV = {"OMP_NUM_THREADS": "1"}


def _dry_run(tmp_path: Path, budget: str) -> dict:
    out = run_cli(["train", MLP, "--dry-run", "--json", "--nproc", "2", "--memory-budget",
                   budget, *SETS], tmp_path, timeout=300, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["strategy"]


def test_dry_run_says_auto_picks_ddp_where_the_model_fits_one_rank(tmp_path: Path) -> None:
    choice = _dry_run(tmp_path, "48MiB")
    assert choice["strategy"] == "ddp", choice
    assert choice["ddp_peak"] <= choice["target"] < 48 * 2**20
    assert "within memory.target" in choice["sentence"]


def test_dry_run_says_auto_picks_fsdp_where_only_two_ranks_hold_the_model(
        tmp_path: Path) -> None:
    choice = _dry_run(tmp_path, "30MiB")
    assert choice["strategy"] == "fsdp", choice
    assert choice["fsdp_peak"] <= choice["target"] < choice["ddp_peak"]
    assert choice["states"] > choice["target"]  # the states alone are over one rank's
    assert "sharded over 2 ranks a rank holds" in choice["sentence"]


def test_auto_under_torchrun_picks_ddp_for_a_model_that_fits_and_records_why(
        tmp_path: Path) -> None:
    out = run_cli(["train", MLP, "--nproc", "2", "--steps", "2", "--memory-budget", "48MiB",
                   "--run-dir", "run", "--no-progress", "--no-report", *SETS], tmp_path,
                  timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "distributed.strategy auto: ddp — the model's states" in out.stderr
    assert out.stderr.count("distributed.strategy auto:") == 1  # rank 0 says it
    events = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl")
              if e["event"] == "strategy_auto"]
    assert len(events) == 1 and events[0]["strategy"] == "ddp" and events[0]["world_size"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["distributed"]["strategy"] == "ddp"  # resume takes what was chosen


def test_tune_nproc_times_the_strategies_on_two_ranks_and_its_config_trains(
        tmp_path: Path) -> None:
    out = run_cli(["tune", MLP, "--nproc", "2", "--factors", "memory", "--memory-budget",
                   "30MiB", "--budget-s", "90", "--output", "tuned.yaml", "--json",
                   "--set", "train.batch_size=4", "--set", "train.effective_batch_size=8"],
                  tmp_path, timeout=400, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = json.loads(out.stdout)["memory_plan"]
    assert plan["world_size"] == 2
    rows = {(r["levers"]["strategy"], r["combination"]): r for r in plan["rows"]}
    assert {strategy for strategy, _ in rows} == {"ddp", "fsdp"}
    # sharded, a rank holds ~22.4 MiB: fits the 25.5 MiB target where ddp's 32.4 does not
    assert rows[("fsdp", "fsdp")]["predicted_peak"] <= plan["target_bytes"] < rows[
        ("ddp", "ddp, no lever")]["predicted_peak"]
    assert any(n.startswith("sharding over 2 ranks") for n in plan["notes"])
    # ddp (4bit state) and fsdp both fit: the leading of each trained on 2 ranks, the
    # choice made from those rates (where the budget let none run, a projection, said)
    chosen = next(r for r in plan["rows"] if r["chosen"])
    measured = [r for r in plan["rows"] if r["timed_on_ranks"] == 2]
    table = render_plan(plan)
    if measured:
        assert chosen in measured and "measured on 2 ranks" in chosen["note"]
        assert all(r["samples_per_s"] and r["rounds"] for r in measured)
        assert " 2 ranks  chosen: measured on 2 ranks" in table
    else:
        assert any("not measured on 2 ranks" in r["note"] for r in plan["rows"]), table
    assert "projection" in table  # the fsdp rows not measured say so
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert tuned["distributed"]["strategy"] == chosen["levers"]["strategy"]
    assert tuned["distributed"]["reshard_after_forward"] == chosen["levers"][
        "reshard_after_forward"]
    trained = run_cli(["train", "--config", "tuned.yaml", "--nproc", "2", "--steps", "2",
                       "--run-dir", "run", "--no-progress", "--no-report"], tmp_path,
                      timeout=300, env=ENV)
    assert trained.returncode == 0, trained.stderr
