"""job/runner.py: the one step the trainer, tune's trials, the batch search and the dry
run take; its epoch roll-over and data-wait accounting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from redline.config import load_config
from redline.data import iterate_from, train_loader
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.job.build import build_job
from redline.job.runner import JobRunner
from redline.run.trainer import Trainer
from redline.task import resolve_task
from redline.tuning import trial

from ..conftest import TOY

ARGS = [f"task={TOY}", "task_args.n=64", "train.batch_size=16", "train.steps=3",
        "train.eval_every=0", "checkpoint.every=0", "telemetry.trackers=[jsonl]"]


def test_tune_trials_take_the_step_training_takes(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer.fit and a trial Runner both step through JobRunner.step, with the OOM guard
    on and the precision's global flags set (fp32's 'highest', not the 'medium' outside)."""
    seen: list[tuple[str, Any, bool, str]] = []
    original = JobRunner.step

    def spy(self: JobRunner, *args: Any, **kwargs: Any) -> Any:
        seen.append((phase, type(self.engine).step, self.engine.guard is not None,
                     torch.get_float32_matmul_precision()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JobRunner, "step", spy)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        config = load_config(None, ARGS)
        phase = "train"
        assert Trainer(config, run_dir=tmp_path / "r", progress=False).fit().steps == 3
        phase = "trial"
        task, device = resolve_task(config.task, config.task_args), DeviceInfo.detect("cpu")
        with trial.runners(task, [config], device) as (runner,):
            runner.time(0.0)
    finally:
        torch.set_float32_matmul_precision(before)
    trained = {s[1:] for s in seen if s[0] == "train"}
    timed = {s[1:] for s in seen if s[0] == "trial"}
    assert len([s for s in seen if s[0] == "train"]) >= 3 and timed  # both stepped through it
    assert trained == timed
    (engine_step, guarded, matmul), = trained
    assert engine_step is Engine.step and guarded and matmul == "highest"


class _Engine:
    """Records the batches it is given; each step takes `step_s` on the clock."""

    def __init__(self, clock: _Clock, step_s: float = 0.0) -> None:
        self.batches: list[Any] = []
        self.clock, self.step_s = clock, step_s

    def step(self, batch: Any, loss_fn: Any) -> torch.Tensor:
        self.batches.append(batch)
        self.clock.now += self.step_s
        return torch.tensor(1.0)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _SlowData(Dataset):
    """Reading a sample takes `read_s` on the clock: the data wait."""

    def __init__(self, n: int, clock: _Clock, read_s: float) -> None:
        self.n, self.clock, self.read_s = n, clock, read_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.clock.now += self.read_s
        return torch.tensor([float(i)])


def _runner(n: int, batch: int, read_s: float = 0.0, step_s: float = 0.0
            ) -> tuple[JobRunner, _Engine, Any]:
    clock = _Clock()
    job = build_job(load_config(None, [f"task={TOY}", "task_args.n=64"]), resolve_task(TOY),
                    DeviceInfo.detect("cpu"))
    loader = train_loader(_SlowData(n, clock, read_s), batch, seed=3, options={})
    runner = JobRunner(job, loader, clock=clock)
    engine = _Engine(clock, step_s)
    runner.engine = engine  # type: ignore[assignment]
    return runner, engine, loader


def test_an_epoch_ends_without_a_step_and_next_step_rolls_into_the_next() -> None:
    runner, engine, loader = _runner(n=8, batch=4)  # two steps an epoch
    runner.begin_epoch(0)
    assert runner.step() is not None and runner.step() is not None
    assert runner.step() is None and len(engine.batches) == 2  # the epoch is done
    runner.begin_epoch(0)
    runner.next_step(), runner.next_step(), runner.next_step()
    assert runner.epoch == 1 and len(engine.batches) == 5
    first_of_next = next(iterate_from(loader, 1, 0))
    assert torch.equal(engine.batches[-1], first_of_next)  # as training's epoch 1 begins
    assert not torch.equal(engine.batches[0], first_of_next)  # reshuffled per epoch


def test_next_step_starts_at_epoch_zero_and_a_resume_skips_the_batches_done() -> None:
    runner, engine, loader = _runner(n=12, batch=4)
    runner.next_step()
    assert torch.equal(engine.batches[0], next(iterate_from(loader, 0, 0)))
    runner.begin_epoch(0, 2)
    runner.step()
    assert torch.equal(engine.batches[1], list(iterate_from(loader, 0, 0))[2])


def test_the_data_wait_is_the_loaders_time_and_timing_counts_whole_steps() -> None:
    runner, engine, _ = _runner(n=8, batch=4, read_s=0.25, step_s=2.0)
    runner.begin_epoch(0)
    runner.step()
    assert runner.wait == pytest.approx(1.0)  # four samples read, the step not counted
    steps, busy, waited = runner.time(5.0)  # 3 s a step: two steps reach 5 s
    assert steps == 2 and busy == pytest.approx(6.0) and waited == pytest.approx(2.0)
    steps, busy, waited = runner.time(0.0, batch=torch.zeros(4, 1))  # a given batch
    assert (steps, busy, waited) == (1, pytest.approx(2.0), 0.0)
    assert len(engine.batches) == 4  # the roll-over into epoch 1 still stepped once
