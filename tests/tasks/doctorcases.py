"""Tasks for `redline doctor`'s evidence and fp16's loss-scaler accounting (issue 19, case 7).

- `InfGradient`: a gradient that is inf at every loss scale under fp16-mixed: the backward
  of its output adds 1e5 in the gradient's own dtype (float16 overflows at 65504; float32
  does not), while the loss stays finite. Under fp16 the scaler skips every update.
- `Calibrating`: its output's backward multiplies the gradient by 2**10 in the gradient's
  dtype, and its loss is the output's mean over a batch of 16, so the scaled gradient is
  `scale * 64`: float16 overflows while the scale is above 1023, i.e. for the 7 steps in
  which the scaler halves from 65536 to 512, and never again (the inputs are small and the
  layer has no bias, so no gradient downstream is larger): normal start-up calibration.
- `SpeedKnee`: a step of micro-batch b sleeps `b * 1 ms * (1 + |log2(b / 4)|)`, so
  samples/s peaks at 4 while every size up to its 64 samples fits memory: the batch
  search stops for speed, not memory.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset


class _AddInf(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad + torch.tensor(1e5, dtype=grad.dtype)  # inf in float16


class _Times1024(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.tensor(2.0 ** 10, dtype=grad.dtype)


class _Kicked(nn.Module):
    def __init__(self, dim: int, kick: type[torch.autograd.Function]) -> None:
        super().__init__()
        # no bias: its gradient would be the batch's sum of the output's gradients
        self.lin, self.kick = nn.Linear(dim, 1, bias=False), kick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kick.apply(self.lin(x))


class _Base:
    kick: type[torch.autograd.Function] = _AddInf

    def __init__(self, n: int = 256, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        # small inputs: the weight's gradient stays below the output's (float16 holds it)
        self.x = torch.randn(n, dim, generator=g) / 64
        self.y = torch.zeros(n, 1)
        self.dim = dim

    def build_model(self) -> nn.Module:
        return _Kicked(self.dim, self.kick)

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        return model(x).float().mean()  # d loss / d output = 1 / batch: known exactly


class InfGradient(_Base):
    name = "infgrad"
    kick = _AddInf


class Calibrating(_Base):
    name = "calibrating"
    kick = _Times1024


class SpeedKnee:
    name = "speedknee"

    def __init__(self, n: int = 64, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.dim = dim

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, 1)

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if model.training:
            b = x.shape[0]
            time.sleep(b * 1e-3 * (1 + abs(math.log2(b / 4))))
        return nn.functional.mse_loss(model(x).float(), y)
