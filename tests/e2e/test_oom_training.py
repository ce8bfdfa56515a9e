"""Training under a CPU memory budget that forces OOMs: nothing lost, math unchanged."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from redline.config import load_config
from redline.events import Callback, State
from redline.run.trainer import Trainer
from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli
from ..unit.test_tune import _peak_at

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each

BASE = [f"task={TOY}", "task_args.n=2048", "task_args.hidden=512", "train.steps=14",
        "train.batch_size=64", "train.eval_every=0", "memory.grow_after=4",
        "checkpoint.every=0", "telemetry.log_every=7"]


def _budget() -> int:
    # Between what micro-batches of 32 and 64 need: 64 fails, 32 fits.
    return (_peak_at(32) + _peak_at(64)) // 2


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)["model"]


class _Follow(Callback):
    """Replays a micro-batch schedule on a run without budget or guard."""

    def __init__(self, trainer: Trainer, schedule: dict[int, int]) -> None:
        self.trainer, self.schedule = trainer, schedule

    def on_batch_start(self, state: State, batch: object) -> None:
        self.trainer.engine.micro_batch_size = self.schedule[state.step + 1]


def test_budget_forced_ooms_keep_every_step_and_the_exact_math(tmp_path: Path) -> None:
    budget = _budget()
    config = load_config(None, [*BASE, f"memory.budget={budget}"])
    result = Trainer(config, run_dir=tmp_path / "oom", progress=False).fit()
    assert result.steps == 14 and result.samples == 14 * 64
    changes = [e for e in read_jsonl(tmp_path / "oom" / "events.jsonl")
               if e["event"] == "micro_batch"]
    ooms = [c for c in changes if c["reason"] == "oom"]
    assert ooms and ooms[0]["step"] == 1 and (ooms[0]["old"], ooms[0]["new"]) == (64, 32)
    assert any(c["reason"] == "grow" for c in changes)  # it tried to grow back
    assert len(ooms) >= 2  # ...and growing back hit the budget again, mid-run

    # The schedule the guard ran, replayed without budget: bit-identical parameters.
    schedule, size = {}, 64
    for step in range(1, 15):
        for c in changes:
            if c["step"] == step and c["reason"] == "oom":
                size = c["new"]
        schedule[step] = size
        for c in changes:
            if c["step"] == step and c["reason"] == "grow":
                size = c["new"]
    reference_config = load_config(None, [*BASE, "memory.oom_guard=false"])
    reference = Trainer(reference_config, run_dir=tmp_path / "ref", progress=False)
    reference.user_callbacks.append(_Follow(reference, schedule))
    assert reference.fit().steps == 14
    a, b = _final_params(tmp_path / "oom"), _final_params(tmp_path / "ref")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_first_step_oom_equals_the_smaller_micro_batch_from_the_start(tmp_path: Path) -> None:
    budget = _budget()
    no_grow = [*BASE, "memory.grow_after=0"]
    Trainer(load_config(None, [*no_grow, f"memory.budget={budget}"]), run_dir=tmp_path / "a",
            progress=False).fit()
    Trainer(load_config(None, [*no_grow, "train.batch_size=32",
                               "train.effective_batch_size=64"]),
            run_dir=tmp_path / "b", progress=False).fit()
    a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_micro_batch_of_one_failing_exits_cleanly_with_a_checkpoint(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--steps", "5", "--memory-budget", "64KiB", "--run-dir", "r",
                   "--set", "task_args.hidden=512"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "even with a micro-batch of 1" in out.stderr and "memory.budget" in out.stderr
    doctor = run_cli(["doctor", "r"], tmp_path)
    assert "out of memory even at a micro-batch of 1" in doctor.stdout
    assert "oom-retries" not in doctor.stdout  # no batch size fits: not the advice
    # The advice is a command that runs: with the cause fixed (a budget that fits), it goes on.
    command = re.search(r"with (redline train .*)\.$", doctor.stdout, re.M)
    assert command, doctor.stdout
    args = [*shlex.split(command.group(1))[1:], "--memory-budget", "64MiB"]
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr


def test_cli_batch_size_auto_and_tune(tmp_path: Path) -> None:
    env = {"REDLINE_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "tasks").mkdir()  # a task file given relative to where tune runs
    (tmp_path / "tasks" / "toy.py").write_text(Path(TOY.split(":")[0]).read_text())
    relative = "tasks/toy.py:ToyRegression"
    tune = run_cli(["tune", relative, "--batch-only", "--memory-budget", "2MiB", "--set",
                    "task_args.hidden=512", "--set", "task_args.n=2048", "--output",
                    "tuned.yaml"], tmp_path, env=env)
    assert tune.returncode == 0, tune.stderr
    assert "largest fitting micro-batch" in tune.stdout and "<-" in tune.stdout
    assert "spread" in tune.stdout.splitlines()[0]  # each timed size's rounds, and the rule
    assert re.search(r"chosen \d+ \(micro-batch \d+.*noise", tune.stdout)
    # the budget sized the search; training from the tuned config is not tracked by it
    assert yaml.safe_load((tmp_path / "tuned.yaml").read_text())["memory"]["budget"] is None
    assert "memory.budget is left out of the tuned config" in tune.stdout
    train = run_cli(["train", "--config", "tuned.yaml", "--steps", "3", "--json"], tmp_path,
                    env=env)
    assert train.returncode == 0, train.stderr
    assert "every tensor operation is tracked" not in train.stderr
    kept = run_cli(["tune", relative, "--batch-only", "--memory-budget", "2MiB", "--set",
                    "task_args.hidden=512", "--set", "task_args.n=2048", "--keep-budget",
                    "--output", "kept.yaml"], tmp_path, env=env)
    assert kept.returncode == 0, kept.stderr
    tracked = run_cli(["train", "--config", "kept.yaml", "--steps", "2"], tmp_path, env=env)
    assert tracked.returncode == 0 and "every tensor operation is tracked" in tracked.stderr
    elsewhere = tmp_path / "elsewhere"  # the tuned config names its task file absolutely
    elsewhere.mkdir()
    again = run_cli(["train", "--config", str(tmp_path / "tuned.yaml"), "--steps", "2"],
                    elsewhere, env=env)
    assert again.returncode == 0, again.stderr
    auto = run_cli(["train", TOY, "--batch-size", "auto", "--memory-budget", "2MiB",
                    "--set", "task_args.hidden=512", "--set", "task_args.n=2048",
                    "--steps", "3", "--run-dir", "auto"], tmp_path, env=env)
    assert auto.returncode == 0, auto.stderr
    events = read_jsonl(tmp_path / "auto" / "events.jsonl")
    tuned = [e for e in events if e["event"] == "autobatch"]
    assert tuned and tuned[0]["cache_hit"] is True  # tune's result, verified in one step


def test_sigterm_during_the_batch_search_stops_at_once_and_says_so(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDLINE_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.Popen([sys.executable, "-m", "redline", "train", TOY, "--batch-size",
                             "auto", "--memory-budget", "2MiB", "--set", "task_args.sleep_s=0.3",
                             "--steps", "3", "--run-dir", "r", "--no-progress"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # the search has begun
        if "autobatch: probing" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM before the first step: nothing was trained" in stderr
    assert "nothing to resume" in stdout and "Traceback" not in stderr
    assert not (tmp_path / "r").exists()  # made by this run, holding nothing: removed


def test_batch_size_auto_never_replaces_what_the_user_set(tmp_path: Path) -> None:
    """A cached search keeps the user's lr; --resume compares the resolved values."""
    import yaml

    env = {"REDLINE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["train", TOY, "--batch-size", "auto", "--memory-budget", "2MiB", "--set",
            "task_args.hidden=512", "--set", "task_args.n=2048", "--steps", "3"]
    first = run_cli([*args, "--run-dir", "a"], tmp_path, env=env)  # searches, caches
    assert first.returncode == 0, first.stderr
    mine = run_cli([*args, "--run-dir", "b", "--set", "train.lr=1e-3"], tmp_path, env=env)
    assert mine.returncode == 0, mine.stderr
    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    tuned = [e for e in read_jsonl(tmp_path / "b" / "events.jsonl") if e["event"] == "autobatch"]
    assert tuned[0]["cache_hit"] is True
    assert config["train"]["lr"] == tuned[0]["lr"] == 1e-3  # not the cached run's 2e-4
    assert "batch_size: auto: micro-batch" in mine.stderr and "lr 0.001" in mine.stderr
    changed = run_cli([*args[:-1], "6", "--run-dir", "b", "--resume", "--set",
                       "train.lr=1e-2"], tmp_path, env=env)
    assert changed.returncode == 2, changed.stderr
    assert "train.lr=0.001" in changed.stderr and "train.lr=0.01" in changed.stderr
    longer = run_cli([*args[:-1], "6", "--run-dir", "b", "--resume", "--set",
                      "train.lr=1e-3"], tmp_path, env=env)
    assert longer.returncode == 0, longer.stderr
