"""The toy task with a fault on one rank, for the torchrun tests: rank `fail_rank` kills
itself (SIGKILL), raises an error of its own code, or runs out of memory on batches larger
than `oom_above`, from its `fail_at`-th training forward on. Other ranks, and every rank
of a single-process run, train the toy task unchanged."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn
from toy import ToyRegression


class FaultyRank(ToyRegression):
    name = "faulty-rank"

    def __init__(self, fail_rank: int = 1, fail_at: int = 0, how: str = "oom",
                 oom_above: int = 4, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fail_rank, self.fail_at, self.how, self.oom_above = fail_rank, fail_at, how, oom_above
        self.forwards = 0

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if model.training and int(os.environ.get("RANK", "0")) == self.fail_rank:
            self.forwards += 1
            if self.forwards >= self.fail_at:
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.how == "raise":
                    raise ValueError("the user's loss failed on this rank")
                if self.how == "oom" and batch[0].shape[0] > self.oom_above:
                    raise torch.OutOfMemoryError("injected: out of memory on this rank only")
        return super().loss(model, batch)
