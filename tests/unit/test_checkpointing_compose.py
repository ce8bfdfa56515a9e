"""Activation checkpointing composes with what redline does around a step (issue 20): the
OOM guard's redo under a real CPU budget, the non-finite skip, bf16 autocast, emulated fp8
and torch.compile, each through the Engine as training runs them.

Tolerances: the same ops on the same inputs give bit-identical results on CPU, so the
checkpointed-vs-guarded comparisons are exact; checkpointed-vs-plain ones allow fp32's
rtol=1e-5, atol=1e-6 (test_checkpointing.py says why), bf16's and fp8's their rounding.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from redline.device import DeviceInfo
from redline.engine import Engine, EngineConfig
from redline.memory.blocks import find_blocks
from redline.memory.checkpointing import Checkpointing
from redline.memory.guard import OOMGuard
from redline.memory.probe import MemoryBudget
from redline.memory.sizes import live_tensor_bytes
from redline.memory.tracker import MemoryTracker
from redline.precision import PrecisionConfig, get_precision

from ..tasks.memgpt import MemGPT

CPU = DeviceInfo.detect("cpu")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _exact_matmuls() -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _model(dropout: float = 0.1, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return MemGPT(n=8, seq=32, width=width, layers=3, heads=4, dropout=dropout).build_model()


def _batch(n: int = 8) -> list[torch.Tensor]:
    return [torch.randint(0, 128, (n, 33), generator=torch.Generator().manual_seed(1))]


def _loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    ids = batch[0]
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _engine(model: nn.Module, mode: str, precision: Any = "fp32",
            **settings: Any) -> tuple[Engine, nn.Module]:
    if mode != "none":
        Checkpointing(find_blocks(model), mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = get_precision(precision, CPU) if isinstance(precision, str) else precision
    return Engine(model, optimizer, EngineConfig(policy, **settings)), model


def _assert_same(a: nn.Module, b: nn.Module, rtol: float = 0.0, atol: float = 0.0) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


def _step_peak(mode: str, micro: int) -> int:
    """The tracked peak of a first step at `micro` above what was alive before it."""
    engine, model = _engine(_model(), mode, micro_batch_size=micro)
    with MemoryTracker(baseline=live_tensor_bytes(model, engine.optimizer)) as tracker:
        engine.step(_batch(), _loss)
    return tracker.peak


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_the_oom_guard_redoes_a_checkpointed_step_under_a_real_budget(mode: str) -> None:
    # a budget between the step's peaks at micro-batch 8 and 4: the first attempt runs out
    # of memory for real (the tracker raises torch.OutOfMemoryError mid-step)
    budget = (_step_peak(mode, 8) + _step_peak(mode, 4)) // 2
    model = _model()
    optimizer_holder: list[Any] = []

    def check() -> MemoryBudget:
        return MemoryBudget(budget, CPU, baseline=live_tensor_bytes(model, *optimizer_holder))

    engine, _ = _engine(model, mode, micro_batch_size=8, oom_guard=OOMGuard(8, 0),
                        memory_check=check)
    optimizer_holder.append(engine.optimizer)
    torch.manual_seed(5)
    engine.step(_batch(), _loss)
    assert engine.guard.retries == 1 and engine.micro_batch_size == 4  # it was redone
    reference, _ = _engine(_model(), mode, micro_batch_size=4)
    torch.manual_seed(5)
    reference.step(_batch(), _loss)
    _assert_same(model, reference.model)  # the redone step is the step run at 4: exactly
    plain, _ = _engine(_model(), "none", micro_batch_size=4)
    torch.manual_seed(5)
    plain.step(_batch(), _loss)
    _assert_same(model, plain.model, RTOL, ATOL)


def test_a_nonfinite_checkpointed_step_is_skipped_and_training_goes_on() -> None:
    engine, model = _engine(_model(), "full", skip_nonfinite=True)
    plain, _ = _engine(_model(), "none", skip_nonfinite=True)
    before = copy.deepcopy(model.state_dict())

    def poisoned(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return _loss(m, batch) * float("inf")

    for e in (engine, plain):
        torch.manual_seed(3)
        e.step(_batch(), poisoned)
        assert not e.applied
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    for e in (engine, plain):
        torch.manual_seed(4)
        e.step(_batch(), _loss)
        assert e.applied
    _assert_same(model, plain.model, RTOL, ATOL)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_bf16_autocast_recomputes_in_bf16(mode: str) -> None:
    results = []
    for m in ("none", mode):
        engine, model = _engine(_model(), m, "bf16-mixed")
        torch.manual_seed(2)
        engine.step(_batch(), _loss)
        results.append(model)
    # the recompute runs under the forward's autocast state: the same bf16 kernels
    _assert_same(results[1], results[0], RTOL, ATOL)


@pytest.mark.slow  # torchao's emulated fp8: seconds
def test_emulated_fp8_layers_checkpoint_and_give_the_fp8_gradient() -> None:
    config = PrecisionConfig(name="fp8-emulated", fp8_keep_first_last=False, fp8_min_numel=0)
    results = []
    for mode in ("none", "selective", "full"):
        policy = get_precision("fp8-emulated", CPU, config)
        model = policy.convert_module(_model(width=64))
        assert any(type(m).__name__ == "Float8Linear" for m in model.modules())
        engine, _ = _engine(model, mode, policy)
        torch.manual_seed(2)
        engine.step(_batch(), _loss)
        results.append(model)
    # the recompute rescales from the same amax: the same fp8 rounding
    _assert_same(results[1], results[0], RTOL, ATOL)
    _assert_same(results[2], results[0], RTOL, ATOL)


@pytest.mark.slow  # compiling: ~40 s on 2 cores
def test_a_compiled_selectively_checkpointed_model_gives_the_eager_gradient() -> None:
    # selective is the mode torch.compile treats specially (its policy becomes the
    # compiler's recompute choice); full is torch's vanilla checkpoint under compile
    x = _batch(4)
    eager = _model(dropout=0.0)  # compiled dropout draws from inductor's own generator
    _loss(eager, x).backward()
    model = _model(dropout=0.0)
    Checkpointing(find_blocks(model), "selective")
    _loss(torch.compile(model), x).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        # inductor fuses and reorders fp32 reductions: compiled-vs-eager tolerance
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_torchs_compile_notice_about_context_fn_is_dropped_and_others_kept() -> None:
    # torch logs it once, on a cold compile only (a warm cache skips it), so the filter on
    # its logger is checked directly: noise here (memory/checkpointing.py says why)
    logger = logging.getLogger("torch._higher_order_ops.wrap")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)

    assert not logger.filter(record("\nDetected that context_fn is passed to "
                                    "torch.utils.checkpoint under torch.compile.\n"))
    assert logger.filter(record("something else torch says"))
