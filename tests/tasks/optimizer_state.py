"""A MemGPT whose training steps can be stretched, so a test can kill its run midway."""

from __future__ import annotations

import time

import torch

# loaded by path (redline.plugins.import_file puts this folder on sys.path), run from
# anywhere: memgpt is imported as its neighbour, not through the tests package
from memgpt import MemGPT
from torch import nn


class SlowGPT(MemGPT):
    name = "slow-memgpt"

    def __init__(self, sleep_s: float = 0.0, **shape: int) -> None:
        super().__init__(**shape)
        self.sleep_s = sleep_s

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        if self.sleep_s and model.training:
            time.sleep(self.sleep_s)
        return super().loss(model, batch)
