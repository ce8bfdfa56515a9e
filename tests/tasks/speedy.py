"""Tasks whose fastest settings a test constructs, for `redline tune`'s end-to-end tests.

Their step times are sleeps, not compute, so on a quiet machine the search has a clear
answer to find. A loaded machine still stretches every step's real work, so the tests
that run these assert only that tune chose a setting it measured; the choices themselves
are tested on given rates (test_tune.py, test_quality.py):

- `Constructed`: a step of micro-batch b sleeps `b * per_sample * (1 + |log2(b / 32)|)`
  ms, so samples/s peaks at b = 32 and halves one doubling away from it; under bf16
  autocast it sleeps half as long, so bf16-mixed is the fastest precision. The cost is
  per sample and steep on purpose: the real per-step work (the optimizer, the loader, the
  OOM guard; about 1 ms here, several on a loaded CI machine) adds the same time to every
  step and so favours larger batches, and the peak stays at 32 until that overhead
  reaches 32 samples' sleep (16 ms under bf16). A shallower cost of 1 ms a step at 32 let
  a loaded machine's overhead move the knee to 128. Its forward scales activations by 1e5
  and subtracts them from themselves, which overflows float16 (max 65504: inf - inf is
  NaN) but not bfloat16 or float32, so fp16-mixed trains to a non-finite loss: the quality
  check must exclude it.
- `SlowData`: each sample takes `item_ms` to load and each step `step_ms` to run, so with
  one loader worker the loading overlaps the step and samples/s nearly doubles.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

PEAK = 32


class _Scaled(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = self.inner(x) * 1e5  # float16 overflows here; bfloat16 and float32 do not
        return self.out(torch.tanh(big / 1e5 + (big - big)))  # inf - inf: NaN in float16


class Constructed:
    name = "constructed"

    def __init__(self, n: int = 4096, dim: int = 8, per_sample_ms: float = 1.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) / dim ** 0.5
        self.dim, self.per_sample_s = dim, per_sample_ms / 1e3

    def build_model(self) -> nn.Module:
        return _Scaled(self.dim)

    def train_data(self) -> Dataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> Dataset:
        return TensorDataset(self.x[:64], self.y[:64])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if model.training:
            b = x.shape[0]
            fast = (torch.is_autocast_enabled("cpu")
                    and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            away = abs(math.log2(b / PEAK))  # doublings from the peak
            time.sleep(b * self.per_sample_s * (1 + away) * (0.5 if fast else 1))
        return nn.functional.mse_loss(model(x).float(), y)


class _Slow(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, item_s: float) -> None:
        self.x, self.y, self.item_s = x, y, item_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.item_s)
        return self.x[i], self.y[i]


class SlowData:
    name = "slow-data"

    def __init__(self, n: int = 2048, item_ms: float = 0.5, step_ms: float = 8.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.item_s, self.step_s = item_ms / 1e3, step_ms / 1e3

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def train_data(self) -> Dataset:
        return _Slow(self.x, self.y, self.item_s)

    def eval_data(self) -> Dataset:
        return TensorDataset(self.x[:32], self.y[:32])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if model.training:
            time.sleep(self.step_s)
        return nn.functional.mse_loss(model(x), y)
