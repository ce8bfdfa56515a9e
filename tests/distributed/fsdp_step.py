"""Run under torchrun (2 ranks): Engine steps of an FSDP2-sharded model (redline's
shard_model, each block then the root) on each rank's half of a batch, against one process
stepping the whole batch; rank 0 writes what it found to argv[1] as JSON.

Cases: one whole micro-batch; accumulation over 4 micro-batches with the OOM guard on;
clipping (the norm over all shards equals the single process's); bf16-mixed; a non-finite
step skipped on the host path and on the fused optimizer's found_inf path; an in-place
change of a view output refused; an optimizer built before sharding refused."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from redline import Engine
from redline.distributed import World, init
from redline.memory.blocks import find_blocks
from redline.memory.sharding import shard_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def sharded(precision: str = "fp32") -> Net:
    net = model()
    return shard_model(net, find_blocks(net), precision)  # type: ignore[return-value]


def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(m(x), y)


def full(net: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() for p in net.parameters()]  # every rank calls: a collective


def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def compare(x: torch.Tensor, y: torch.Tensor, share: slice, comm: Any, precision: str,
            micro: int | None, clip: float | None, guard: bool, steps: int = 1
            ) -> dict[str, Any]:
    alone = model()
    one = Engine(alone, torch.optim.SGD(alone.parameters(), lr=0.1), precision,
                 grad_clip=clip)
    net = sharded(precision)
    two = Engine(net, torch.optim.SGD(net.parameters(), lr=0.1), precision,
                 micro_batch_size=micro, grad_clip=clip, oom_guard=guard, comm=comm)
    for _ in range(steps):
        one.step((x, y), loss_fn)
        loss = two.step((x[share], y[share]), loss_fn)
    return {"diff": diff(list(alone.parameters()), full(net)),
            "moved": diff(list(alone.parameters()), list(model().parameters())),
            "norm": [one.grad_norm.item(), two.grad_norm.item()],
            "plain_norm": type(two.grad_norm) is torch.Tensor, "loss": loss.item()}


def inferred(x: torch.Tensor, y: torch.Tensor, share: slice) -> dict[str, Any]:
    """No `comm`: the Engine finds the ranks of a sharded model from the process group
    (its agreements time the wait: a number, where no ranks would leave None)."""
    alone = model()
    Engine(alone, torch.optim.SGD(alone.parameters(), lr=0.1)).step((x, y), loss_fn)
    net = sharded()
    engine = Engine(net, torch.optim.SGD(net.parameters(), lr=0.1), micro_batch_size=2,
                    oom_guard=True)
    engine.step((x[share], y[share]), loss_fn)
    return {"diff": diff(list(alone.parameters()), full(net)),
            "ranks_found": engine.sync_wait_s is not None}


def skips(x: torch.Tensor, y: torch.Tensor, share: slice, comm: Any, rank: int,
          host_reads: bool | None) -> float:
    """A step whose loss is inf on rank 1 only: every shard's gradient is then not finite,
    and both ranks skip the update (the largest change of any parameter: 0)."""
    net = sharded()
    before = full(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    engine = Engine(net, optimizer, skip_nonfinite=True, host_reads=host_reads, comm=comm)

    def bad_loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return loss_fn(m, b) * (float("inf") if rank == 1 else 1.0)

    engine.step((x[share], y[share]), bad_loss)
    return diff(before, full(net))


def scaler_skips(x: torch.Tensor, y: torch.Tensor, share: slice, rank: int) -> dict[str, Any]:
    """fp16's GradScaler (precision.FP16Mixed's) over sharded gradients: an inf in rank 1's
    shard alone makes both ranks skip the update and halve the scale (what engine/ranks.py's
    docstring relies on)."""
    net = sharded()
    before = full(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    scaler.scale(loss_fn(net, (x[share], y[share]))).backward()
    if rank == 1:
        next(iter(net.parameters())).grad.to_local().view(-1)[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    return {"moved": diff(before, full(net)), "scale": scaler.get_scale()}


def refusals(x: torch.Tensor, y: torch.Tensor, comm: Any) -> list[str]:
    said = []
    net = sharded()
    engine = Engine(net, torch.optim.SGD(net.parameters(), lr=0.1), comm=comm)

    def in_place(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = m(b[0][:, None].expand(-1, 3, -1))  # a 3-D input: the head returns a view
        out += 1
        return out.mean()

    try:
        engine.step((x, y), in_place)
    except RuntimeError as e:
        said.append(str(e))
    early = model()
    optimizer = torch.optim.SGD(early.parameters(), lr=0.1)  # before sharding: refused
    shard_model(early, find_blocks(early), "fp32")
    try:
        Engine(early, optimizer, comm=comm)
    except ValueError as e:
        said.append(str(e))
    return said


def main() -> None:
    torch.use_deterministic_algorithms(False)
    torch.set_float32_matmul_precision("highest")
    world = World.from_env()
    comm = init(world, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    share = slice(world.rank * 8, (world.rank + 1) * 8)
    result = {
        "whole": compare(x, y, share, comm, "fp32", None, None, False),
        "accumulated": compare(x, y, share, comm, "fp32", 2, None, True),
        "clipped": compare(x, y, share, comm, "fp32", 4, 0.05, False),
        "bf16": compare(x, y, share, comm, "bf16-mixed", None, None, False, steps=3),
        "inferred": inferred(x, y, share),
        "scaler": scaler_skips(x, y, share, world.rank),
        "skip_host": skips(x, y, share, comm, world.rank, None),
        "skip_flag": skips(x, y, share, comm, world.rank, False),
        "refused": refusals(x, y, comm),
        "agreements": comm.counts.get("agree", 0),
    }
    if world.main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    comm.close()


if __name__ == "__main__":
    main()
