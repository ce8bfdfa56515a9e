"""Issue 19's observed case 3: a small BatchNorm CNN on 8x8 digits, bringing its own SGD.

No layer qualifies for fp8 (convolutions stay as they are, and the one Linear is both the
first and the last, with 10 outputs), so fp8-emulated trains exactly as fp32 does. The
digits are drawn here (ten fixed 8x8 prototypes plus noise) so the test needs no
scikit-learn; the task imports nothing from redline.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Digits:
    name = "digits-cnn"

    def __init__(self, n: int = 640, noise: float = 0.6) -> None:
        g = torch.Generator().manual_seed(19)
        prototypes = torch.rand(10, 1, 8, 8, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        images = prototypes[labels] + noise * torch.randn(n, 1, 8, 8, generator=g)
        self.train = TensorDataset(images[: n - 128], labels[: n - 128])
        self.test = TensorDataset(images[n - 128:], labels[n - 128:])

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def train_data(self) -> TensorDataset:
        return self.train

    def eval_data(self) -> TensorDataset:
        return self.test

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x).float(), y)

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        right = total = 0
        for x, y in loader:
            right += int((model(x).argmax(-1) == y).sum())
            total += len(y)
        return {"accuracy": right / total}
