"""Run under torchrun, 2 ranks, gloo: what _torch_compat.arm_all_reduce relies on in DDP.

Each rank runs the engine's pattern on its own data: two micro-batches whose forwards
run under no_sync (the first one's backward too), then the arming, then the last
backward. A comm hook counts the all-reduces. Rank 0 writes to argv[1] how many each
rank made unarmed (a no_sync forward's backward outside no_sync: none expected) and
armed (exactly one expected), and how far the armed gradients are from the average of
both ranks' local gradients."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from redline._torch_compat import arm_all_reduce


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def data(rank: int) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + rank))


def local_grads(x: torch.Tensor) -> list[torch.Tensor]:
    m = model()
    m(x[:3]).sum().backward()
    m(x[3:]).sum().backward()
    return [p.grad.clone() for p in m.parameters()]  # type: ignore[union-attr]


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(model())
    calls = [0]

    # unannotated: DDP rejects annotations that are strings (from __future__)
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        calls[0] += 1
        work = dist.all_reduce(bucket.buffer().div_(size), async_op=True)
        return work.get_future().then(lambda f: f.value()[0])  # type: ignore[union-attr]

    ddp.register_comm_hook(None, hook)
    x = data(rank)

    with ddp.no_sync():
        unarmed = ddp(x).sum()
    unarmed.backward()
    unarmed_calls = calls[0]
    ddp.zero_grad(set_to_none=True)

    calls[0] = 0
    with ddp.no_sync():
        ddp(x[:3]).sum().backward()
        last = ddp(x[3:]).sum()
    arm_all_reduce(ddp)
    last.backward()
    armed_calls = calls[0]

    mine, other = local_grads(x), local_grads(data(1 - rank))
    average = [(a + b) / 2 for a, b in zip(mine, other, strict=True)]
    got = [p.grad for p in ddp.parameters()]
    diff = max((g - a).abs().max().item() for g, a in zip(got, average, strict=True))
    differed = max((a - b).abs().max().item() for a, b in zip(mine, other, strict=True))
    counts = [torch.zeros(2, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([unarmed_calls, armed_calls]))
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"unarmed_calls": [int(c[0]) for c in counts],
                       "armed_calls": [int(c[1]) for c in counts],
                       "max_diff_from_average": diff, "ranks_differed": differed}, f)
    # Every rank done (the result written and closed), then out without tearing down: on a
    # busy machine a rank aborted in the teardown ("terminate called without an active
    # exception": a gloo or reducer thread still joinable when its owner was destroyed),
    # even with DDP deleted and a barrier before destroy_process_group. What this script
    # checks is done by then; the teardown is not what it tests.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
