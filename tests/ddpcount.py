"""A DDP model whose all-reduces are counted: a comm hook that records each bucket it is
handed and returns the bucket unchanged (one process: nothing to average)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def counted_ddp(model: nn.Module) -> tuple[DistributedDataParallel, list[int]]:
    """`model` in DDP (a process group must exist), and the list of bucket indices its
    comm hook has all-reduced so far."""
    ddp = DistributedDataParallel(model)
    calls: list[int] = []

    # unannotated: DDP rejects annotations that are strings (from __future__)
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        calls.append(bucket.index())
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    return ddp, calls
