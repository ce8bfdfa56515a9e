"""Run under torchrun (2 ranks): an out-of-memory error on rank 1 in a sharded step
(before the first forward; inside a block's forward; inside a block's backward of an
early micro-batch), redone by both ranks with a smaller micro-batch, ends equal to one process
stepping the whole batch; rank 0 writes what it found to argv[1] as JSON, with the time a
guarded step took against an unguarded one (the unit-boundary agreements' cost)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn

from redline import Engine
from redline.distributed import World, init
from redline.memory.blocks import find_blocks
from redline.memory.sharding import shard_model


class _Boom(torch.autograd.Function):
    """Identity whose backward runs out of memory when its block is armed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: Block) -> torch.Tensor:
        ctx.block = block
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.block.fire("backward")
        return grad, None


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.armed: str | None = None

    def fire(self, where: str) -> None:
        if self.armed == where:
            self.armed = None
            raise torch.OutOfMemoryError(f"injected in {where}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fire("forward")
        return _Boom.apply(x + torch.tanh(self.fc(x)), self)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(m(x), y)


def redone(x: torch.Tensor, y: torch.Tensor, share: slice, comm: Any, rank: int,
           where: str) -> dict[str, Any]:
    alone = model()
    Engine(alone, torch.optim.SGD(alone.parameters(), lr=0.1)).step((x, y), loss_fn)
    net = model()
    shard_model(net, find_blocks(net), "fp32")
    engine = Engine(net, torch.optim.SGD(net.parameters(), lr=0.1), micro_batch_size=4,
                    oom_guard=True, comm=comm)
    failing = [rank == 1 and where == "loss"]

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if failing[0]:  # before the model's first forward: FSDP has not even set up
            failing[0] = False
            raise torch.OutOfMemoryError("injected before the first forward")
        return loss_fn(m, batch)

    if rank == 1 and where != "loss":
        net.layers[1].armed = where  # type: ignore[union-attr]
    engine.step((x[share], y[share]), loss)
    full = [p.full_tensor() for p in net.parameters()]
    return {"diff": max((a - b).abs().max().item()
                        for a, b in zip(alone.parameters(), full, strict=True)),
            "micro": engine.micro_batch_size}


def step_time(x: torch.Tensor, y: torch.Tensor, comm: Any, guard: bool) -> float:
    net = model()
    shard_model(net, find_blocks(net), "fp32")
    engine = Engine(net, torch.optim.SGD(net.parameters(), lr=0.1), micro_batch_size=2,
                    oom_guard=guard, comm=comm)
    for _ in range(3):
        engine.step((x, y), loss_fn)
    t, steps = time.perf_counter(), 30
    for _ in range(steps):
        engine.step((x, y), loss_fn)
    return (time.perf_counter() - t) / steps


def main() -> None:
    torch.set_float32_matmul_precision("highest")
    world = World.from_env()
    comm = init(world, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    share = slice(world.rank * 8, (world.rank + 1) * 8)
    result: dict[str, Any] = {w: redone(x, y, share, comm, world.rank, w)
                              for w in ("loss", "forward", "backward")}
    if "--time" in sys.argv:
        before = comm.counts.get("agree", 0)
        result["guarded_s"] = step_time(x[share], y[share], comm, True)
        result["agreements_per_step"] = (comm.counts.get("agree", 0) - before) / 33
        result["unguarded_s"] = step_time(x[share], y[share], comm, False)
    if world.main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    comm.close()


if __name__ == "__main__":
    main()
