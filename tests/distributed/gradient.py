"""Run under torchrun: one Engine step of a DDP model on each rank's half of a batch, with
micro-batches (no_sync, then the synchronising backward), against one process stepping
the whole batch; rank 0 writes the largest parameter difference to argv[1]."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from redline import Engine
from redline.distributed import World, init


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(m(x), y)


def main() -> None:
    world = World.from_env()
    comm = init(world, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    share = slice(world.rank * 8, (world.rank + 1) * 8)

    alone = model()
    Engine(alone, torch.optim.SGD(alone.parameters(), lr=0.1), micro_batch_size=3,
           grad_clip=None).step((x, y), loss_fn)

    local = model()
    ddp = DistributedDataParallel(local)
    Engine(ddp, torch.optim.SGD(local.parameters(), lr=0.1), micro_batch_size=3,
           grad_clip=None, oom_guard=True, comm=comm).step((x[share], y[share]), loss_fn)

    diff = max((a - b).abs().max().item()
               for a, b in zip(alone.parameters(), local.parameters(), strict=True))
    moved = max((a - b).abs().max().item()
                for a, b in zip(alone.parameters(), model().parameters(), strict=True))
    if world.main:
        with open(sys.argv[1], "w") as f:
            json.dump({"diff": diff, "moved": moved, "agreements": comm.counts}, f)
    comm.close()


if __name__ == "__main__":
    main()
