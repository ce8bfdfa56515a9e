from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from torch import nn

from redline.engine import Engine
from redline.events import Callback, Dispatcher, State
from redline.memory.guard import OOMGuard, OutOfMemoryAtMinimum


def test_policy_shrinks_grows_back_and_backs_off() -> None:
    g = OOMGuard(configured=16, grow_after=3)
    assert g.decide(oom=False) is None and g.current == 16  # at the configured size: stay
    assert g.decide(oom=True).new == 8 and g.decide(oom=True).new == 4
    assert [g.decide(oom=False) for _ in range(2)] == [None, None]
    grow = g.decide(oom=False)
    assert grow is not None and (grow.old, grow.new, grow.reason) == (4, 8, "grow")
    assert g.decide(oom=True).new == 4  # the grown size failed: wait twice as long now
    assert all(g.decide(oom=False) is None for _ in range(5))
    assert g.decide(oom=False).new == 8
    assert g.retries == 3 and [c.reason for c in g.history].count("grow") == 2
    restored = OOMGuard(configured=16, grow_after=3)
    restored.load_state_dict(g.state_dict())
    assert restored.state_dict() == g.state_dict()


def test_policy_odd_sizes_and_minimum() -> None:
    g = OOMGuard(configured=5, grow_after=0)
    assert [g.decide(oom=True).new for _ in range(3)] == [3, 2, 1]
    assert all(g.decide(oom=False) is None for _ in range(50))  # grow_after=0: never grow
    with pytest.raises(OutOfMemoryAtMinimum):
        g.decide(oom=True)
    with pytest.raises(ValueError, match="grow_after"):
        OOMGuard(configured=4, grow_after=-1)


class _OOMInBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory while `armed` says so."""

    armed: ClassVar[list[bool]] = [False]

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        if _OOMInBackward.armed[0]:
            raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory (test)")
        return grad


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 32)
        self.body = nn.Sequential(nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_OOMInBackward.apply(self.first(x)))


def _batches(n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g))
            for _ in range(n_steps)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    noise = torch.randn_like(x) * 0.01  # the redone attempt must draw the same noise
    return nn.functional.mse_loss(model(x + noise), y)


class Schedule(Callback):
    def __init__(self) -> None:
        self.changes: list[dict] = []

    def on_micro_batch_change(self, state: State, info: dict) -> None:
        self.changes.append(info)


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _run_reference(micro_by_step: list[int], batches: list) -> nn.Module:
    model, opt = _fresh()
    torch.manual_seed(1)
    engine = Engine(model, opt, "fp32", grad_clip=1.0)
    for micro, batch in zip(micro_by_step, batches, strict=True):
        engine.micro_batch_size = micro
        engine.step(batch, _loss)
    return model


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_recovered_steps_are_bit_identical_to_planned_micro_batches(phase: str) -> None:
    batches = _batches(12)
    oom_at = {3, 4, 9}  # steps (1-based) whose first attempt at the current size fails
    model, opt = _fresh()
    torch.manual_seed(1)
    spy = Schedule()
    state = State(model=model, optimizer=opt)
    engine = Engine(model, opt, "fp32", grad_clip=1.0, micro_batch_size=16,
                    oom_guard=OOMGuard(16, grow_after=3), dispatcher=Dispatcher([spy]),
                    state=state)
    failed_once: set[int] = set()

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        step = state.step + 1
        first_try = step in oom_at and step not in failed_once
        if phase == "forward" and first_try:
            failed_once.add(step)
            raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory (test)")
        _OOMInBackward.armed[0] = phase == "backward" and first_try
        if _OOMInBackward.armed[0]:
            failed_once.add(step)
        return _loss(m, batch)

    try:
        for batch in batches:
            engine.step(batch, loss)
            state.step += 1
    finally:
        _OOMInBackward.armed[0] = False
    # The micro-batch each step finally ran with, from the guard's events.
    sizes, current, i = [], 16, 0
    for step in range(1, 13):
        while i < len(spy.changes) and spy.changes[i]["step"] == step \
                and spy.changes[i]["reason"] == "oom":
            current = spy.changes[i]["new"]
            i += 1
        sizes.append(current)
        while i < len(spy.changes) and spy.changes[i]["step"] == step:
            current = spy.changes[i]["new"]
            i += 1
    assert [c["reason"] for c in spy.changes].count("oom") == 3
    assert all(c["phase"] == phase for c in spy.changes if c["reason"] == "oom")
    assert sizes != [16] * 12 and min(sizes) == 4  # 16 -> 8 (step 3) -> 4 (step 4)
    reference = _run_reference(sizes, batches)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_a_micro_batch_of_one_that_fails_restores_the_step_start() -> None:
    model, opt = _fresh()
    model.eval()  # BatchNorm in eval mode accepts a single sample
    before = copy.deepcopy(model.state_dict())
    engine = Engine(model, opt, "fp32", micro_batch_size=2, oom_guard=OOMGuard(2))
    rng = torch.get_rng_state()

    def always_oom(m: nn.Module, batch: object) -> torch.Tensor:
        torch.rand(1)  # consumes RNG, which the guard must give back
        raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory (test)")

    with pytest.raises(OutOfMemoryAtMinimum, match="in forward at step 1 even with a micro"):
        engine.step(_batches(1)[0], always_oom)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA out of memory (a message, not the type: judged by type only)",
    "NCCL error: unhandled cuda error, NCCL version 2.21.5"])
def test_other_errors_are_not_retried(message: str) -> None:
    model, opt = _fresh()
    engine = Engine(model, opt, "fp32", micro_batch_size=16, oom_guard=True)

    def broken(m: nn.Module, batch: object) -> torch.Tensor:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match=message.split()[0]):
        engine.step(_batches(1)[0], broken)
    assert engine.guard is not None and engine.guard.retries == 0


class _Plain(nn.Module):
    """No dropout, no BatchNorm: a step that draws no random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _plain_run(oom_at: set[int], draw_from: int | None = None) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = _Plain()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spy, state = Schedule(), State()
    engine = Engine(model, opt, "fp32", micro_batch_size=16, oom_guard=OOMGuard(16, 0),
                    dispatcher=Dispatcher([spy]), state=state)
    failed: set[int] = set()

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        step = state.step + 1
        x, y = batch
        if draw_from is not None and step >= draw_from:
            x = x + torch.randn_like(x)  # this loss starts drawing random numbers here
        if step in oom_at and step not in failed:
            failed.add(step)
            raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory (test)")
        return nn.functional.mse_loss(m(x), y)

    for batch in _batches(12):
        engine.step(batch, loss)
        state.step += 1
    return model, spy.changes


def test_a_step_that_draws_nothing_is_redone_exactly_without_snapshots() -> None:
    model, changes = _plain_run({5})
    assert [(c["step"], c["new"]) for c in changes] == [(5, 8)]
    assert "exact" not in changes[0]
    reference = _run_plain_reference([16] * 4 + [8] * 8)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _run_plain_reference(sizes: list[int]) -> nn.Module:
    torch.manual_seed(0)
    model = _Plain()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = Engine(model, opt, "fp32")
    for micro, batch in zip(sizes, _batches(12), strict=True):
        engine.micro_batch_size = micro
        engine.step(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    return model


def test_a_draw_that_begins_unseen_is_reported_and_then_snapshotted() -> None:
    """Snapshots stopped after two steps drew nothing; when the loss starts drawing and
    the very step fails, the redo cannot rewind what it drew: the event says so, and every
    later step is snapshotted (the next OOM is exact again)."""
    _, changes = _plain_run({7, 10}, draw_from=7)
    assert [(c["step"], c.get("exact", True)) for c in changes] == [(7, False), (10, True)]


def test_micro_batching_says_once_what_it_does_to_batchnorm() -> None:
    """BatchNorm normalises each micro-batch with its own statistics: the split step is
    not the full-batch step. The engine says so once, naming the layers."""
    seen: list[dict] = []

    class Spy(Callback):
        def on_anomaly(self, state: State, info: dict) -> None:
            seen.append(info)

    model, opt = _fresh()
    engine = Engine(model, opt, "fp32", micro_batch_size=8, dispatcher=Dispatcher([Spy()]))
    for batch in _batches(3):
        engine.step(batch, _loss)
    assert seen == [{"kind": "batch_statistics", "layers": ["body.0"], "micro_batch": 8,
                     "batch": 16, "step": 1}]
    plain = _Plain()  # no BatchNorm: nothing to say
    silent = Engine(plain, torch.optim.SGD(plain.parameters(), lr=0.1), "fp32",
                    micro_batch_size=8, dispatcher=Dispatcher([Spy()]))
    silent.step(_batches(1)[0], lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert len(seen) == 1


def test_the_cheap_torch_capture_sees_a_draw_and_rewinds_it() -> None:
    from redline.rng import restore_torch_state, same_torch_state, torch_state

    before = torch_state([])
    assert same_torch_state(before, torch_state([]))
    drawn = torch.rand(3)
    assert not same_torch_state(before, torch_state([]))
    restore_torch_state(before)
    assert torch.equal(torch.rand(3), drawn) and not same_torch_state(None, before)
