"""The memory breakdown (memory/breakdown.py, job/memory.py): categories that add up to the
measured steady-state peak, and predictions for other levers and micro-batches within 10 %
of a real tracked step's peak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from redline import batch as batch_tree
from redline.config import load_config
from redline.job.build import build_job
from redline.job.memory import _live, measure_job_breakdown
from redline.job.runner import JobRunner
from redline.memory.breakdown import (
    BlockActivations,
    Breakdown,
    fit_sentence,
    fitting_levers,
    set_flags,
)
from redline.memory.levers import Levers
from redline.memory.tracker import MemoryTracker
from redline.task import resolve_task

TASKS = Path(__file__).parents[1] / "tasks" / "memgpt.py"
GPT = (f"{TASKS}:MemGPT", {"width": 64, "seq": 256, "layers": 4})
MLP = (f"{TASKS}:WideMLP", {})


def _job(spec: str, args: dict[str, Any], micro: int, levers: Levers | None = None,
         step: int | None = None) -> Any:
    levers = levers or Levers()
    sets = [f"task={spec}", f"train.batch_size={micro}", "device=cpu", "memory.oom_guard=false"]
    if step is not None:
        sets.append(f"train.effective_batch_size={step}")
    sets += [f"task_args.{k}={v}" for k, v in args.items()]
    sets += [f"{k}={'null' if v is None else v}" for k, v in levers.updates().items()]
    config = load_config(None, sets)
    job = build_job(config, resolve_task(config.task, config.task_args))
    return job, batch_tree.first_samples(job.train_set, step or micro)


def _real_peak(spec: str, args: dict[str, Any], micro: int, levers: Levers,
               step: int | None = None) -> int:
    """A real step's peak with `levers`, tracked at the steady state (the second step);
    `step`: the samples of a step, accumulated in micro-batches of `micro`."""
    job, batch = _job(spec, args, micro, levers, step)
    runner = JobRunner(job)
    runner.step_on(batch)
    job.optimizer.zero_grad(set_to_none=True)
    tracker = MemoryTracker(baseline=_live(job))
    with tracker:
        runner.step_on(batch)
    return tracker.peak


@pytest.mark.parametrize("task", [GPT, MLP], ids=["gpt", "mlp"])
@pytest.mark.parametrize("micro", [2, 4])
def test_categories_sum_to_the_measured_steady_state_peak(task: Any, micro: int) -> None:
    job, batch = _job(*task, micro)
    b = measure_job_breakdown(job, batch)
    assert sum(size for _, size in b.rows()) == b.peak
    assert abs(b.temporaries) <= 0.10 * b.peak, b.render()
    assert b.optimizer_state >= 7.9 * b.trainable_elements  # AdamW's two fp32 moments
    assert b.gradients == b.parameters
    assert len(b.blocks) == 4 and all(x.full <= x.selective <= x.none for x in b.blocks)
    # the steady state: more than the first step, which has no optimizer state yet
    fresh, _ = _job(*task, micro)
    tracker = MemoryTracker(baseline=_live(fresh))
    with tracker:
        JobRunner(fresh).step_on(batch)
    assert b.peak > tracker.peak


@pytest.mark.slow
@pytest.mark.parametrize("levers", [Levers(), Levers("selective"), Levers("full"),
                                    Levers("full", 2)], ids=str)
def test_predict_is_within_ten_percent_of_a_real_step(levers: Levers) -> None:
    job, batch = _job(*GPT, 2)
    b = measure_job_breakdown(job, batch)
    for micro in (1, 4):
        real = _real_peak(*GPT, micro, levers)
        assert abs(b.predict(levers, micro) - real) <= 0.10 * real, (levers, micro)


@pytest.mark.slow
@pytest.mark.parametrize("levers", [Levers(), Levers("full", 3)], ids=str)
def test_predict_under_accumulation_is_within_ten_percent_of_a_real_step(levers: Levers
                                                                          ) -> None:
    # the earlier micro-batches' gradients live through the next forward: a whole-batch
    # measurement's negative temporaries must not be subtracted there (bench/levers.py:
    # short by exactly the gradients at micro-batch 1 of 8)
    job, batch = _job(*GPT, 2)
    b = measure_job_breakdown(job, batch)
    b.samples_per_step = 8
    for micro in (1, 4):
        real = _real_peak(*GPT, micro, levers, step=8)
        assert abs(b.predict(levers, micro) - real) <= 0.10 * real, (levers, micro)


@pytest.mark.slow
def test_predict_8bit_state_within_ten_percent() -> None:
    pytest.importorskip("torchao")
    if not _builds_8bit():
        pytest.skip("job/build.py does not build memory.optimizer_state 8bit yet "
                    "(the optimizer-state part)")
    job, batch = _job(*MLP, 2)
    b = measure_job_breakdown(job, batch)
    levers = Levers(optimizer_state="8bit")
    real = _real_peak(*MLP, 4, levers)
    assert abs(b.predict(levers, 4) - real) <= 0.10 * real


def _builds_8bit() -> bool:
    job, _ = _job(*MLP, 1, Levers(optimizer_state="8bit"))
    return type(job.optimizer).__name__ != "AdamW"


def _made(blocks: int = 4) -> Breakdown:
    return Breakdown(micro_batch=2, parameters=100, gradients=100, optimizer_state=200,
                     optimizer_state_kind="fp32", trainable_elements=25,
                     blocks=[BlockActivations(f"layers.{i}", 100, 50, 10)
                             for i in range(blocks)],
                     other_activations=20, temporaries=-20, peak=800, source="made")


def test_predict_scales_activations_and_swaps_the_state_kind() -> None:
    b = _made()
    assert b.predict(Levers(), 2) == b.peak == 400 + 420 - 20
    assert b.predict(Levers(), 4) == 400 + 840 - 40
    assert b.state_bytes("8bit") == int(25 * (2 + 8 / 256))
    # full on every block: each keeps 10, the last recomputes 90 beyond that
    assert b.predict(Levers("full"), 2) == 400 + 20 + 40 + 90 - 20
    # the first block only: its recompute comes once the later blocks freed theirs
    assert b.recompute(Levers("full", 1), 2) == 0
    assert b.fewest_blocks(Levers("full"), 2, 700) == 2
    assert b.fewest_blocks(Levers("full"), 2, 100) is None


def test_fit_sentence_names_the_levers_and_their_flags() -> None:
    b = _made()
    assert fit_sentence(b, 1000)[0]
    assert "fits: yes (80%" in fit_sentence(b, 1000)[1]
    fits, words = fit_sentence(b, 700, state_kinds=("fp32",))
    assert not fits and "would fit with selective checkpointing of" in words
    options = fitting_levers(b, 2, 700, ("fp32",))
    assert options and all(p <= 700 for _, p in options)
    assert set_flags(options[0][0]) in words
    assert set_flags(Levers("full", 3, "8bit")) == (
        "--set memory.activation_checkpointing=full --set memory.checkpointed_blocks=3 "
        "--set memory.optimizer_state=8bit")
    assert "no lever combination" in fit_sentence(b, 300)[1]


def test_round_trips_through_a_dict() -> None:
    b = _made()
    assert Breakdown.from_dict(b.to_dict()) == b
    assert "layers.3" in b.render(1000) and "peak" in b.render()


def test_the_cpu_default_budget_check_sees_the_steady_state() -> None:
    """The engine's memory check (the CPU default budget) tracks a size's second step too:
    the first has no optimizer state yet, so a step that only the second overflows would
    otherwise run unchecked into the machine's limit."""
    import torch
    from torch import nn

    from redline.device import DeviceInfo
    from redline.engine import Engine
    from redline.memory.guard import OutOfMemoryAtMinimum
    from redline.memory.probe import MemoryBudget, live_tensor_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    params = live_tensor_bytes(model)
    device = DeviceInfo.detect("cpu")
    engine = Engine(model, optimizer, micro_batch_size=1, oom_guard=True,
                    memory_check=lambda: MemoryBudget(int(3.5 * params), device,
                                                      baseline=live_tensor_bytes(model,
                                                                                 optimizer)))
    batch = (torch.randn(1, 256), torch.randn(1, 1))

    def loss(m: nn.Module, b: Any) -> Any:
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    engine.step(batch, loss)  # parameters + gradients: fits
    with pytest.raises(OutOfMemoryAtMinimum):  # + AdamW's two moments: does not
        engine.step(batch, loss)


@pytest.mark.slow
def test_low_bit_states_are_counted_by_their_inner_tensors() -> None:
    """torchao's 8-bit AdamW state is a tensor subclass whose own storage is not memory: the
    sizes count its inner tensors (about 2 bytes per element), where reading the subclass's
    storage raised."""
    optim = pytest.importorskip("torchao.optim")
    import torch
    from torch import nn

    from redline.memory.breakdown import tensor_bytes
    from redline.memory.probe import live_tensor_bytes

    model = nn.Linear(512, 512)
    optimizer = optim.AdamW8bit(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    n = sum(p.numel() for p in model.parameters())
    state = tensor_bytes(list(optimizer.state.values()))
    assert 1.9 * n < state < 2.2 * n
    assert live_tensor_bytes(optimizer) == state
