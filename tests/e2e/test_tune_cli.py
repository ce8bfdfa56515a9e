"""`redline tune` over every factor, run as a user would: that it runs, prints its table and
reasons, excludes what breaks training, and writes a config that trains. Which setting the
real clock finds fastest is the machine's (a loaded one moves it), so these tests assert
that the choice is one the search measured, never which; the decisions themselves are
tested on given rates (test_tune.py, test_quality.py). The tasks (tests/tasks/speedy.py)
still sleep so that the search has a clear answer to find on a quiet machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from redline.telemetry.jsonl import read_jsonl
from redline.tuning.loader_choice import cores

from ..conftest import ROOT, TOY, run_cli

SPEEDY = ROOT / "tests" / "tasks" / "speedy.py"
CASES = ROOT / "tests" / "tasks" / "tunecases.py"
CONSTRUCTED = f"{SPEEDY}:Constructed"
SLOW_DATA = f"{SPEEDY}:SlowData"

pytestmark = pytest.mark.slow


def test_tune_picks_the_constructed_fastest_setting_and_excludes_the_unstable_precision(
        tmp_path: Path) -> None:
    out = run_cli(["tune", CONSTRUCTED, "--factors", "precision,batch", "--budget-s", "60",
                   "--set", "train.batch_size=8", "--set", "train.grow_effective_batch=true",
                   "--output", "tuned.yaml", "--json"],
                  tmp_path, env={"REDLINE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    precision, micro = tuned["precision"]["name"], tuned["train"]["batch_size"]
    admitted = [r["setting"].split(",")[0] for r in report["rows"]
                if r["factor"] == "precision" and r["note"].startswith("admitted")]
    assert precision in admitted and precision != "fp16-mixed"
    searched = [r["setting"] for r in report["rows"] if r["factor"] == "batch"]
    assert f"{precision}, micro-batch {micro}" in searched  # a size its search timed
    # asked to grow, the effective batch followed the micro-batch; lr_scaling none: same lr
    assert (tuned["train"]["effective_batch_size"] or micro) == micro
    assert tuned["train"]["lr"] == 2e-4
    fp16 = next(r for r in report["rows"] if r["setting"].startswith("fp16-mixed"))
    assert fp16["note"].startswith("excluded") and "not finite" in fp16["note"]
    bf16 = next(r for r in report["rows"] if r["setting"].startswith("bf16-mixed,"))
    assert bf16["note"].startswith("admitted") and "within noise" in bf16["note"]
    assert "fp16-mixed excluded" in report["reasons"]["precision"]
    assert report["speedup"] is not None and report["start"]["train"]["batch_size"] == 8
    asked = {"precision", "batch", "result"} | {f"batch in {n}" for n in admitted}
    assert set(report["reasons"]) <= asked  # only what was asked for
    assert {"precision", "batch", "result"} <= set(report["reasons"])
    train = run_cli(["train", "--config", "tuned.yaml", "--steps", "3", "--no-report",
                     "--run-dir", "run"], tmp_path)
    assert train.returncode == 0, train.stderr
    assert "trained 3 steps" in train.stdout and precision in train.stdout


def test_tune_prints_its_table_choices_and_measured_speedup(tmp_path: Path) -> None:
    out = run_cli(["tune", TOY, "--budget-s", "30", "--factors",
                   "batch,channels_last,loader,compile", "--output", "toy.yaml"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["factor", "setting", "samples/s"]
    for factor in ("batch", "channels_last", "loader", "compile"):
        assert any(line.startswith(f"  {factor}: ") for line in lines), out.stdout
    assert "channels_last: off: the model has no convolution weights" in out.stdout
    assert "compile: off, not tried" in out.stdout  # a 1000-step toy cannot repay a compile
    # the tuned config timed against the start, or the start itself written (nothing beat it)
    assert (("over the starting config" in out.stdout and "measured side by side" in out.stdout)
            or "result: the starting config is written: no setting" in out.stdout), out.stdout
    assert "tuned config: toy.yaml" in out.stdout


@pytest.mark.skipif(cores() < 2, reason="a loader worker needs a core beside the step")
def test_loader_workers_are_timed_where_loading_overlaps_the_step(tmp_path: Path) -> None:
    out = run_cli(["tune", SLOW_DATA, "--factors", "loader", "--set", "train.batch_size=16",
                   "--output", "tuned.yaml", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    workers = tuned["data"]["num_workers"]
    rows = json.loads(out.stdout)["rows"]
    timed = {r["setting"] for r in rows if r["factor"] == "loader"}
    # the step waits on loading: worker counts were timed, and one of them chosen
    assert {"num_workers 0", "num_workers 1"} <= timed, timed
    assert f"num_workers {workers}" in timed
    assert tuned["data"]["persistent_workers"] is (workers > 0)
    assert tuned["data"]["pin_memory"] is False  # a CPU: nothing to pin for
    zero = next(r for r in rows if r["setting"] == "num_workers 0")
    assert zero["note"].startswith("data wait")

    # data.num_workers: auto makes the same measurement when training starts
    train = run_cli(["train", SLOW_DATA, "--set", "data.num_workers=auto", "--steps", "4",
                     "--batch-size", "16", "--no-report", "--run-dir", "run"], tmp_path)
    assert train.returncode == 0, train.stderr
    said = next(line for line in train.stderr.splitlines()
                if line.startswith("data.num_workers: auto: "))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert said.startswith(f"data.num_workers: auto: {saved['data']['num_workers']}")
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert any(e["event"] == "loader_auto" for e in events)


def test_bad_factor_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    out = run_cli(["tune", TOY, "--factors", "batch,speed"], tmp_path)
    assert out.returncode == 2
    assert "unknown factor speed; choose from precision, batch" in out.stderr
    assert "Traceback" not in out.stderr


def test_batch_size_auto_keeps_the_effective_batch_of_a_batchnorm_cnn(tmp_path: Path) -> None:
    """Observed case 1: a BatchNorm CNN bringing its own SGD, `--batch-size auto` with
    train.effective_batch_size unset, trained 1 sample a step. The effective batch is the
    16 it would have had without auto, whatever micro-batch the machine's speed picks."""
    out = run_cli(["train", f"{CASES}:DigitsCNN", "--batch-size", "auto", "--steps", "2",
                   "--no-report", "--no-progress", "--run-dir", "run"], tmp_path,
                  env={"REDLINE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    train = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert train["effective_batch_size"] == 16 and train["batch_size"] <= 16
    assert "effective batch 16 kept" in out.stderr and "grow_effective_batch" in out.stderr
    line = next(x for x in out.stderr.splitlines() if "samples/s:" in x)
    assert "16 (start)" in line  # the table behind the choice, the start timed in it
    event = next(e for e in read_jsonl(tmp_path / "run" / "events.jsonl")
                 if e["event"] == "autobatch")
    table = event["samples_per_s_table"]
    assert any(r["start"] and r["micro_batch"] == 16 and len(r["rounds"]) >= 2 for r in table)
    assert [r["micro_batch"] for r in table if r["chosen"]] == [train["batch_size"]]
    assert event["effective_batch_size"] == 16


def test_tune_keeps_the_start_when_nothing_beats_it_and_says_so(tmp_path: Path) -> None:
    """Observed case 2: tune wrote a config its own side-by-side timing measured 0.05x the
    start. Here the start (fp32, micro-batch 16) is clearly the fastest: tune writes it,
    and says so."""
    out = run_cli(["tune", f"{CASES}:StartFastest", "--factors", "precision,batch",
                   "--budget-s", "60", "--set", "train.batch_size=16", "--output",
                   "tuned.yaml", "--json"], tmp_path,
                  env={"REDLINE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert tuned["precision"]["name"] == "fp32" and tuned["train"]["batch_size"] == 16
    assert (tuned["train"]["effective_batch_size"] or 16) == 16
    assert report["kept_start"] is True
    assert report["reasons"]["result"].startswith("the starting config is written")
    assert "kept (the start)" in report["reasons"]["batch in fp32"]
    start_row = next(r for r in report["rows"]
                     if r["factor"] == "batch" and r["setting"] == "fp32, micro-batch 16")
    assert "the start" in start_row["note"] and len(start_row["rounds"]) >= 2
    text = run_cli(["tune", f"{CASES}:StartFastest", "--factors", "batch", "--budget-s",
                    "30", "--set", "train.batch_size=16", "--output", "again.yaml"], tmp_path,
                   env={"REDLINE_CACHE_DIR": str(tmp_path / "cache")})
    assert text.returncode == 0, text.stderr
    assert "result: the starting config is written" in text.stdout


def test_tune_skips_a_compile_its_budget_cannot_hold_and_says_why(tmp_path: Path) -> None:
    """The compile stage started with 38 s left and took 115 s. Its time is predicted
    from the model's size (151 modules here: minutes), so with 60 s it is not started."""
    out = run_cli(["tune", f"{CASES}:ManyModules", "--factors", "compile", "--budget-s", "60",
                   "--set", "train.steps=10000000", "--output", "tuned.yaml", "--json"],
                  tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    why = report["reasons"]["compile"]
    assert why.startswith("off, not tried: compiling and timing it would take about"), why
    assert "predicted from the model's 151 modules" in why and "raise --budget-s" in why
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert tuned["precision"]["compile"] is False and report["kept_start"] is True
