from __future__ import annotations

import io
from pathlib import Path

import pytest

from redline.config import load_config
from redline.events import Callback, State
from redline.run.trainer import Trainer
from redline.telemetry.jsonl import read_jsonl
from redline.telemetry.progress import Progress

from ..conftest import TOY


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_epoch_start(self, state: State) -> None:
        self.events.append(f"epoch_start {state.epoch}")

    def on_epoch_end(self, state: State) -> None:
        self.events.append(f"epoch_end {state.epoch}")

    def on_eval_end(self, state: State, metrics: dict[str, float]) -> None:
        self.events.append(f"eval {state.step}")

    def on_fit_end(self, state: State) -> None:
        self.events.append(f"fit_end {state.step}")


def test_epochs_limit_the_run_and_fire_epoch_events(tmp_path: Path) -> None:
    # 64 samples, 16 per step: 4 steps per epoch; 2 epochs end the run before 100 steps.
    config = load_config(None, [f"task={TOY}", "task_args.n=64", "train.steps=100",
                                "train.epochs=2", "train.eval_every=3"])
    rec = Recorder()
    result = Trainer(config, run_dir=tmp_path / "r", callbacks=[rec], progress=False).fit()
    assert result.steps == 8 and result.samples == 128
    assert rec.events == ["epoch_start 0", "eval 3", "epoch_end 0", "epoch_start 1", "eval 6",
                          "epoch_end 1", "eval 8", "fit_end 8"]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "loss" in r] == [1]  # one window, in the second epoch


def test_progress_plain_lines_and_rich_bar() -> None:
    plain = io.StringIO()
    bar = Progress(10, stream=plain, interactive=False)
    bar.start(0)
    bar.show({"step": 5, "loss": 0.5, "samples_per_s": 100.0, "step_time_s": 0.01})
    line = plain.getvalue()
    assert "step 5" in line and "loss 0.5" in line and "100.0 samples/s" in line
    assert "ETA" in line

    tty = io.StringIO()
    rich_bar = Progress(10, stream=tty, interactive=True)
    rich_bar.start(0)
    rich_bar.step(4)
    rich_bar.show({"step": 4, "loss": 0.25, "samples_per_s": 50.0})
    rich_bar.close()
    out = tty.getvalue()
    assert "train" in out and "4/10" in out and "loss 0.25" in out


def test_trainer_refuses_missing_task() -> None:
    with pytest.raises(ValueError, match="no task given"):
        Trainer(load_config(None, []))


class _StepCounter(Callback):
    """Counts the steps it has seen; without its state_dict a resume would restart at 0."""

    def __init__(self) -> None:
        self.seen = 0

    def on_step_end(self, state: State, loss: object) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def test_callback_state_dicts_are_kept_in_checkpoints(tmp_path: Path) -> None:
    args = [f"task={TOY}", "train.eval_every=0", "checkpoint.every=5"]
    first, other = _StepCounter(), _StepCounter()
    Trainer(load_config(None, [*args, "train.steps=10"]), run_dir=tmp_path / "r",
            callbacks=[first, other], progress=False).fit()
    resumed, resumed_other = _StepCounter(), _StepCounter()
    Trainer(load_config(None, [*args, "train.steps=14"]), run_dir=tmp_path / "r", resume=True,
            callbacks=[resumed, resumed_other], progress=False).fit()
    assert (first.seen, resumed.seen, resumed_other.seen) == (10, 14, 14)


def test_a_trainer_holds_its_inputs_and_fit_builds_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume without a run directory continues the task's latest run (chosen when the
    trainer is made); the job exists once fit builds it, and says so before."""
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [f"task={TOY}", "task_args.n=64", "train.steps=2"])
    from redline.config import ConfigError

    with pytest.raises(ConfigError, match="no earlier run of 'toy'"):
        Trainer(config, resume=True)
    for stamp in ("toy-20250101-000000", "toy-20250102-000000", "toyother-20260101-000000"):
        (tmp_path / "runs" / stamp).mkdir(parents=True)
    trainer = Trainer(config, resume=True, progress=False)
    assert trainer.run_dir == Path("runs") / "toy-20250102-000000" and trainer.parts is None
    with pytest.raises(RuntimeError, match="built by fit"):
        trainer.engine  # noqa: B018
    fresh = Trainer(config, run_dir=tmp_path / "r", progress=False)
    assert fresh.fit().steps == 2 and fresh.parts is not None
    assert fresh.engine is fresh.parts.job.engine and fresh.parts.run_dir == tmp_path / "r"
    assert fresh.config is config  # the input; the resolved one is the parts'
