"""A model with no repeated blocks, for activation checkpointing's refusal (issue 20)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class NoBlocks:
    name = "no-blocks"

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])
