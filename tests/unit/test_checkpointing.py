"""Activation checkpointing (issue 20): blocks found on real model shapes, and every mode
gives the no-checkpointing gradient while keeping fewer bytes.

Gradients are compared with fp32 tolerance rtol=1e-5, atol=1e-6: a checkpointed block's
recompute runs the same kernels on the same inputs (and replays the same dropout draws), so
on CPU the gradients come out bit-identical; the tolerance leaves room for kernels whose
reduction order is not fixed (CUDA atomics), about ten fp32 ulps of a gradient's size,
far below the 1e-3 difference one wrong dropout mask or a skipped op makes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from redline.errors import ConfigError
from redline.memory.blocks import find_blocks
from redline.memory.checkpointing import Checkpointing
from redline.memory.tracker import MemoryTracker

from ..tasks.memgpt import MemGPT, WideMLP

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _exact_matmuls() -> None:
    # "medium" runs fp32 matmuls in bf16 on this CPU (FACTS): pin the fp32 baseline
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# ---- models of the shapes researchers write -----------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout2d(dropout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.drop(self.bn2(self.conv2(out)))
        return F.relu(out + self.downsample(x))


class ResNetLike(nn.Module):
    """torchvision's layout: a stem, stages as attributes, each a Sequential of BasicBlocks."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8, dropout=dropout),
                                    BasicBlock(8, 8, dropout=dropout))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, dropout),
                                    BasicBlock(16, 16, dropout=dropout))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(4, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.norm = nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.GroupNorm(4, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 3, 1, 1)
        self.down = nn.ModuleList([Down(8, 16), Down(16, 32)])
        self.mid = nn.Conv2d(32, 32, 3, 1, 1)
        self.up = nn.ModuleList([Up(32, 16), Up(16, 8)])
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        skips = []
        for block in self.down:
            skips.append(x)
            x = block(x)
        x = self.mid(x)
        for block in self.up:
            x = block(x) + skips.pop()
        return self.out(x)


def _gpt(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return MemGPT(n=8, seq=32, width=32, layers=3, heads=4, dropout=dropout).build_model()


# ---- finding the blocks -------------------------------------------------------------------

def _names(model: nn.Module, pattern: str | None = None) -> list[str]:
    return [b.name for b in find_blocks(model, pattern)]


def test_blocks_are_found_on_the_shapes_researchers_write() -> None:
    assert _names(_gpt()) == ["layers.0", "layers.1", "layers.2"]
    assert _names(WideMLP().build_model()) == ["1", "2", "3", "4"]  # the residual blocks
    assert _names(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == ["0", "2"]
    # stem has no repeat; each stage's BasicBlocks are blocks, their downsample is not
    assert _names(ResNetLike()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert _names(UNetLike()) == ["down.0", "down.1", "up.0", "up.1"]
    assert _names(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())) == []
    assert find_blocks(nn.Linear(3, 3)) == []
    assert {b.kind for b in find_blocks(ResNetLike())} == {"BasicBlock"}


def test_a_glob_names_the_blocks_and_drops_what_nests_inside_them() -> None:
    model = _gpt()
    assert _names(model, "layers.*") == ["layers.0", "layers.1", "layers.2"]
    assert _names(model, "layers.*.up") == ["layers.0.up", "layers.1.up", "layers.2.up"]
    assert _names(ResNetLike(), "layer2.*") == ["layer2.0", "layer2.1"]


def test_a_glob_that_matches_nothing_is_a_config_error_naming_modules() -> None:
    with pytest.raises(ConfigError) as e:
        find_blocks(_gpt(), "blocks.*")
    message = str(e.value)
    assert "'blocks.*' matches no module" in message
    assert "layers.0" in message and "tokens" in message


# ---- the gradient is the no-checkpointing gradient ---------------------------------------

def _grads(model: nn.Module, mode: str, batch: torch.Tensor,
           loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
           count: int | None = None) -> tuple[dict[str, torch.Tensor], nn.Module]:
    model = copy.deepcopy(model)
    Checkpointing(find_blocks(model), mode, count)
    torch.manual_seed(123)  # the same dropout draws in every mode
    loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters()}, model


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _image_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logsumexp(-1).mean()


CASES = {
    "memgpt": (lambda: _gpt(dropout=0.2),
               lambda: torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1)),
               _lm_loss),
    "resnet": (lambda: ResNetLike(dropout=0.2),
               lambda: torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
               _image_loss),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_each_mode_gives_the_plain_gradient_with_dropout(case: str, mode: str) -> None:
    build, batch, loss = CASES[case]
    model, x = build(), batch()
    model.train()
    plain, _ = _grads(model, "none", x, loss)
    checkpointed, _ = _grads(model, mode, x, loss)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=RTOL, atol=ATOL, msg=name)
    # dropout really draws: another seed gives another gradient (the test can fail)
    other = copy.deepcopy(model)
    torch.manual_seed(7)
    loss(other, x).backward()
    assert any(not torch.allclose(p.grad, plain[n], rtol=RTOL, atol=ATOL)
               for n, p in other.named_parameters())


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_batchnorm_statistics_are_updated_once_not_again_by_the_recompute(mode: str) -> None:
    model, x = ResNetLike(), torch.randn(4, 3, 16, 16)
    _, plain = _grads(model, "none", x, _image_loss)
    _, checkpointed = _grads(model, mode, x, _image_loss)
    buffers = dict(checkpointed.named_buffers())
    assert buffers["layer1.0.bn1.num_batches_tracked"] == 1
    for name, value in plain.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=RTOL, atol=ATOL, msg=name)


def test_checkpointed_blocks_n_checkpoints_only_the_first_n() -> None:
    model, x = _gpt(dropout=0.2), torch.randint(0, 128, (2, 33))
    checkpointing = Checkpointing(find_blocks(model), "full", 2)
    assert checkpointing.checkpointed == 2
    assert [checkpointing.mode_of(i) for i in range(3)] == ["full", "full", "none"]
    ran: list[str] = []  # which blocks' forwards run a second time (the recompute)
    for block in checkpointing.blocks:
        block.module.qkv.register_forward_pre_hook(
            lambda m, a, name=block.name: ran.append(name))
    _lm_loss(model, x).backward()
    assert ran == ["layers.0", "layers.1", "layers.2", "layers.1", "layers.0"]
    checkpointing.set("none")
    assert checkpointing.checkpointed == 0


def test_evaluation_without_grad_runs_the_blocks_plainly() -> None:
    model = _gpt()
    checkpointing = Checkpointing(find_blocks(model), "full")
    with torch.no_grad(), MemoryTracker() as tracker:
        out = model(torch.randint(0, 128, (2, 32)))
    assert not out.requires_grad and tracker.peak > 0
    calls: list[int] = []
    original = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1)  # type: ignore
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 32)))
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert calls == []
    checkpointing.remove()
    assert all("forward" not in vars(b.module) for b in checkpointing.blocks)


def test_state_dict_keys_are_the_models_own_in_every_mode() -> None:
    plain = _gpt().state_dict()
    model = _gpt()
    checkpointing = Checkpointing(find_blocks(model), "full")
    assert list(model.state_dict()) == list(plain)
    checkpointing.set("selective")
    model.load_state_dict(plain)


# ---- what each mode keeps -----------------------------------------------------------------

def _kept_by_forward(model: nn.Module, mode: str, x: torch.Tensor,
                     loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> int:
    """Bytes the forward leaves alive for backward (the loss and its graph's saved tensors)."""
    Checkpointing(find_blocks(model), mode)
    with MemoryTracker() as tracker:
        out = loss(model, x)
    kept = tracker.current
    out.backward()
    return kept


@pytest.mark.parametrize("case", sorted(CASES))
def test_selective_keeps_less_than_none_and_full_less_than_selective(case: str) -> None:
    build, batch, loss = CASES[case]
    model, x = build(), batch()
    kept = {mode: _kept_by_forward(copy.deepcopy(model), mode, x, loss)
            for mode in ("none", "selective", "full")}
    assert kept["full"] < kept["selective"] < kept["none"], kept
