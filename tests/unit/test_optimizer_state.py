"""The optimizer-state lever (memory/optimizer_state.py) through make_optimizer and build_job.

Tolerances, measured on tests/tasks/memgpt.py's MemGPT at its defaults (10 AdamW steps,
lr 1e-3, micro-batch 4, torch 2.13 CPU, torchao 0.18): per parameter tensor,
||p_kind - p_fp32|| / ||p_fp32 - p_start|| was at most 0.016 for 8bit and 0.23 for 4bit;
the test allows 0.05 and 0.4. The low-bit steps run eagerly here (compiled_runs_eagerly):
torchao compiles them otherwise, seconds per parameter shape, and the numbers differ
from the compiled step's by ~1e-5 (fusion), far inside these bounds.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from redline._torch_compat import compiled_runs_eagerly, plain_tensors
from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.errors import MissingExtra
from redline.job.build import build_job
from redline.memory.levers import STATE_BYTES_PER_PARAM
from redline.memory.optimizer_state import make_optimizer
from redline.memory.probe import MemoryBudget
from redline.memory.sizes import live_tensor_bytes
from redline.memory.tracker import MemoryTracker
from tests.tasks.memgpt import MemGPT, OwnOptimizer, WideMLP

pytest.importorskip("torchao")

CPU = DeviceInfo.detect("cpu")
LOW_BIT_TOLERANCE = {"8bit": 0.05, "4bit": 0.4}


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the moments (a quantized one's codes, scales and lookup table)."""
    return sum(t.untyped_storage().nbytes() for state in optimizer.state.values()
               for key, value in state.items() if key != "step"
               for t in plain_tensors(value))


def _steps(task: object, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           steps: int, batch: int) -> None:
    data = task.train_data()  # type: ignore[attr-defined]
    for i in range(steps):
        task.loss(model, data[i * batch:(i + 1) * batch]).backward()  # type: ignore[attr-defined]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["fp32", "8bit", "4bit"])
def test_each_kind_keeps_the_bytes_per_parameter_the_plan_counts(kind: str) -> None:
    task = WideMLP()
    model = task.build_model()
    optimizer = make_optimizer(list(model.parameters()), 1e-3, 0.01, kind)
    with compiled_runs_eagerly():
        _steps(task, model, optimizer, 1, 8)
    per_param = _state_bytes(optimizer) / sum(p.numel() for p in model.parameters())
    # WideMLP's weights are large: torchao's fp32 states for tensors under 4096 elements
    # and its 1 KiB lookup tables add ~1.5-2.5 %
    assert per_param == pytest.approx(STATE_BYTES_PER_PARAM[kind], rel=0.05)


@pytest.mark.slow
def test_low_bit_parameters_stay_within_their_tolerance_of_fp32_adamw() -> None:
    task = MemGPT()
    torch.manual_seed(0)
    start = task.build_model()
    ends = {}
    for kind in ("fp32", "8bit", "4bit"):
        model = copy.deepcopy(start)
        optimizer = make_optimizer(list(model.parameters()), 1e-3, 0.01, kind)
        with compiled_runs_eagerly():
            _steps(task, model, optimizer, 10, 4)
        ends[kind] = model
    for kind, bound in LOW_BIT_TOLERANCE.items():
        drift = max(float((q - p).detach().norm() / (p - s).detach().norm()) for p, q, s in zip(
            ends["fp32"].parameters(), ends[kind].parameters(), start.parameters(),
            strict=True))
        assert 0 < drift <= bound, (kind, drift)


def test_the_tracker_runs_the_compiled_low_bit_step_and_counts_its_state() -> None:
    task = WideMLP()
    model = task.build_model()
    optimizer = make_optimizer(list(model.parameters()), 1e-3, 0.01, "8bit")
    before = live_tensor_bytes(model, optimizer)
    tracker = MemoryTracker(baseline=before)
    with tracker:  # no compiled_runs_eagerly here: the tracker itself must make it eager
        _steps(task, model, optimizer, 1, 8)
    states = _state_bytes(optimizer)
    assert states > 0
    assert tracker.peak - before >= states  # the states were made inside, and counted
    # what stays is what the optimizer now holds (live_tensor_bytes sees the codes too)
    assert tracker.current == pytest.approx(live_tensor_bytes(model, optimizer), rel=0.01)


def test_cpu_offload_on_a_cpu_is_refused_with_the_reason() -> None:
    model = WideMLP().build_model()
    with pytest.raises(ConfigError, match=r"CUDA only.*use memory\.optimizer_state=8bit"):
        make_optimizer(list(model.parameters()), 1e-3, 0.0, "cpu-offload")


def _config(**memory: object) -> RunConfig:
    return RunConfig(task="t").updated({"train.batch_size": 4, "train.steps": 2, **{
        f"memory.{k}": v for k, v in memory.items()}})


def test_a_lever_over_a_tasks_own_optimizer_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError) as e:
        build_job(_config(optimizer_state="8bit"), OwnOptimizer(), CPU)
    message = str(e.value)
    assert "SGD" in message and "replaces redline's AdamW only" in message
    assert "memory.optimizer_state: fp32" in message and "\n" not in message
    kept = build_job(_config(), OwnOptimizer(), CPU)  # fp32: the task's own, untouched
    assert type(kept.optimizer) is torch.optim.SGD


def test_build_job_builds_the_low_bit_optimizer_and_its_schedule_sets_the_lr() -> None:
    job = build_job(_config(optimizer_state="4bit").updated({"train.warmup_steps": 2}),
                    MemGPT(), CPU)
    assert type(job.optimizer).__name__ == "AdamW4bit"
    assert not job.notes  # its float32 lr tensor is train.lr: no "task optimizer" note
    assert job.fingerprint() != build_job(_config(), MemGPT(), CPU).fingerprint()
    with compiled_runs_eagerly():
        loss = job.engine.step(next(iter(job.train_loader())), MemGPT().loss)
    assert torch.isfinite(loss)
    # torchao keeps the lr as a tensor; the warm-up schedule filled it in place
    assert job.lr == pytest.approx(job.config.train.lr) != job.config.train.lr / 2


@pytest.mark.parametrize("precision", ["fp32", "fp16-mixed"])
def test_a_nonfinite_gradient_skips_the_low_bit_update(precision: str) -> None:
    """The low-bit optimizers take no found_inf flag: the engine reads the norm on the host
    (fp32), fp16's GradScaler skips by its own check; either way nothing moves."""
    config = _config(optimizer_state="8bit").updated({"precision.name": precision})
    job = build_job(config, MemGPT(), CPU)
    batch = next(iter(job.train_loader()))
    with compiled_runs_eagerly():
        job.engine.step(batch, MemGPT().loss)  # the states exist from here
        params = [p.detach().clone() for p in job.model.parameters()]
        steps = [float(s["step"]) for s in job.optimizer.state.values()]
        job.engine.step(batch, lambda m, b: MemGPT().loss(m, b) * float("nan"))
    assert not job.engine.applied
    assert all(torch.equal(p, q) for p, q in zip(params, job.model.parameters(), strict=True))
    assert [float(s["step"]) for s in job.optimizer.state.values()] == steps


def test_a_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    model = WideMLP().build_model()
    with pytest.raises(MissingExtra, match=r"optimizer_state=8bit needs torchao.*\[fp8\]"):
        make_optimizer(list(model.parameters()), 1e-3, 0.0, "8bit")


def _peak(micro: int) -> int:
    job = build_job(_config(optimizer_state="8bit").updated(
        {"train.batch_size": micro, "train.effective_batch_size": 32}), MemGPT(), CPU)
    tracker = MemoryTracker(baseline=live_tensor_bytes(job.model, job.optimizer))
    with tracker:
        job.engine.step(next(iter(job.train_loader())), MemGPT().loss)
    return tracker.peak


@pytest.mark.slow
def test_the_oom_guard_redoes_a_low_bit_step_and_makes_its_state_once() -> None:
    """An OOM in the forward pass is redone with smaller micro-batches before the optimizer
    step: torchao's state is made once, by the step that went through."""
    budget = int(_peak(8) * 1.05)
    assert _peak(32) > budget  # the whole batch does not fit: the guard must split it
    job = build_job(_config(optimizer_state="8bit").updated({"train.batch_size": 32}),
                    MemGPT(), CPU)
    batch = next(iter(job.train_loader()))
    with MemoryBudget(budget, CPU, baseline=live_tensor_bytes(job.model, job.optimizer)):
        for _ in range(2):
            assert torch.isfinite(job.engine.step(batch, MemGPT().loss))
    assert job.engine.micro_batch_size < 32
    states = list(job.optimizer.state.values())
    assert len(states) == sum(1 for p in job.model.parameters() if p.requires_grad)
    assert {float(s["step"]) for s in states} == {2.0}
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in states)
