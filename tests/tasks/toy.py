"""A task written by "someone else" against the protocol only: no redline import.

It draws from every RNG the trainer restores (dropout and input noise use torch's global
generator), so exact-resume tests fail if any RNG state is lost.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import TensorDataset


class ToyRegression:
    name = "toy"

    def __init__(self, n: int = 512, dim: int = 16, hidden: int = 64,
                 sleep_s: float = 0.0, depth: int = 1) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.sleep_s = sleep_s  # stretches steps so a test can kill the run midway
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(dim, 1, generator=g))
        self.dim, self.hidden, self.depth = dim, hidden, depth

    def build_model(self) -> nn.Module:
        middle = [layer for _ in range(self.depth - 1)
                  for layer in (nn.Linear(self.hidden, self.hidden), nn.GELU())]
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.GELU(), nn.Dropout(0.1),
                             *middle, nn.Linear(self.hidden, 1))

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> TensorDataset:
        return TensorDataset(self.x[:128], self.y[:128])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.sleep_s and model.training:
            time.sleep(self.sleep_s)
        x = x + 0.01 * torch.randn_like(x)
        return nn.functional.mse_loss(model(x).float(), y)

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        err = [(model(x) - y).abs().mean().item() for x, y in loader]
        return {"mae": sum(err) / len(err)}

    def samples(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> list:
        """Each input as a 4x4 grey image (the same for every setting), the prediction as a
        text beside the target's, and its absolute error."""
        x, y = batch
        pred = model(x).float()
        out = []
        for i in range(x.shape[0]):
            grid = x[i, :16].reshape(4, 4) if self.dim >= 16 else x[i].reshape(1, -1)
            image = ((grid - grid.min()) / (grid.max() - grid.min() + 1e-9)).numpy()
            out.append(_Sample(f"input {i}", images={"input": image},
                               texts={"target": f"{y[i].item():.3f}",
                                      "prediction": f"{pred[i].item():.3f}"},
                               metrics={"abs_error": (pred[i] - y[i]).abs().item()}))
        return out


class _Sample:
    """Duck-typed like redline.task.Sample: this task imports nothing from redline."""

    def __init__(self, title: str, images: dict, texts: dict, metrics: dict) -> None:
        self.title, self.images, self.texts, self.metrics = title, images, texts, metrics
