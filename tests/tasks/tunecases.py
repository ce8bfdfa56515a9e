"""Tasks for issue 19's speed-decision cases (redline tune and `batch_size: auto`).

- `DigitsCNN`: a small BatchNorm CNN on 8x8 images (1500 training samples, synthetic
  digits-like data: no scikit-learn needed) that brings its own SGD with momentum, as a
  user's model does (observed case 1: `--batch-size auto` shrank its effective batch
  16 -> 1).
- `StartFastest`: its step times are sleeps, and the start (micro-batch 16 in fp32) is
  clearly the fastest: a step sleeps `step_ms` up to 16 samples and `per_sample_ms` a
  sample beyond (a third of the samples/s at 32), and under any autocast or with weights
  in another dtype it sleeps `slow` times as long (observed case 2: tune must keep the
  start and say so).
- `ManyModules`: a model of `layers` small linear layers (a large predicted compile), so
  redline tune's compile stage cannot fit in a short budget and is skipped with the
  prediction.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def _digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images of 10 classes: a fixed template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(y)))


class DigitsCNN:
    name = "digits-cnn"

    def __init__(self, n: int = 1800, width: int = 16) -> None:
        x, y = _digits(n)
        self.width = width
        self.train = TensorDataset(x[:1500], y[:1500])
        self.eval = TensorDataset(x[1500:], y[1500:])

    def build_model(self) -> nn.Module:
        c = self.width
        return nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                             nn.ReLU(), _Block(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(c, 10))

    def train_data(self) -> Dataset:
        return self.train

    def eval_data(self) -> Dataset:
        return self.eval

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)


class StartFastest:
    name = "start-fastest"

    def __init__(self, n: int = 2048, step_ms: float = 24.0, per_sample_ms: float = 3.0,
                 slow: float = 4.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.step_s, self.per_sample_s, self.slow = step_ms / 1e3, per_sample_ms / 1e3, slow

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def train_data(self) -> Dataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> Dataset:
        return TensorDataset(self.x[:32], self.y[:32])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if model.training:
            b = x.shape[0]
            took = self.step_s if b <= 16 else b * self.per_sample_s
            other = (torch.is_autocast_enabled("cpu")
                     or next(model.parameters()).dtype != torch.float32)
            time.sleep(took * (self.slow if other else 1.0))
        return nn.functional.mse_loss(model(x).float(), y)


class ManyModules:
    name = "many-modules"

    def __init__(self, layers: int = 150, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.layers = layers
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.mean(dim=1, keepdim=True)

    def build_model(self) -> nn.Module:
        return nn.Sequential(*(nn.Linear(8, 8) for _ in range(self.layers)), nn.Linear(8, 1))

    def train_data(self) -> Dataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> Dataset:
        return TensorDataset(self.x[:32], self.y[:32])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)
