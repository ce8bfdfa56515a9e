"""Sharded checkpoints across world sizes: run alone (one process, a plain model) or under
torchrun (each block and the root `fully_shard`ed, AdamW built after, gloo).

    ckpt_reshard.py save DIR   2 AdamW steps on each rank's share of a fixed batch, then
                               checkpoint_sharded.save_sharded into DIR/checkpoints;
                               DIR/saved-N.pt: the full model and optimizer state saved
                               and the loss of one more step (rank 0; N the world size)
    ckpt_reshard.py load DIR   load DIR's checkpoint into a fresh model and optimizer;
                               DIR/loaded-N.pt: what was loaded (full) and the next
                               step's loss, for the test to compare with saved-M.pt
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from redline import checkpoint_sharded
from redline.checkpoint import list_checkpoints
from redline.distributed import Comm, World

BATCH = 8


def build(world: World) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    if world.distributed:
        for block in (model[0], model[2]):
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, world: World, n: int) -> float:
    """One AdamW step on this rank's share of batch `n`; the loss over the whole batch."""
    g = torch.Generator().manual_seed(100 + n)
    x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)
    share = BATCH // world.size
    rows = slice(world.rank * share, (world.rank + 1) * share)
    loss = nn.functional.mse_loss(model(x[rows]), y[rows])
    loss.backward()  # FSDP averages the gradients: the whole batch's mean
    optimizer.step()
    optimizer.zero_grad()
    total = loss.detach().clone()
    if world.distributed:
        dist.all_reduce(total)
        total /= world.size
    return float(total)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a copy: a plain model's state_dict holds the live tensors, which the next step changes
    return copy.deepcopy({"model": model_sd, "optimizer": optim_sd})


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    world = World.from_env()
    if world.distributed:
        dist.init_process_group("gloo")
    comm = Comm(world)
    model, optimizer = build(world)
    if mode == "save":
        for n in range(2):
            step(model, optimizer, world, n)
        checkpoint_sharded.save_sharded(out / "checkpoints", 2, model, optimizer,
                                        {"world_size": world.size} if world.main else None,
                                        keep=3, from_main=comm.from_main)
        saved = full_state(model, optimizer)
        saved["next_loss"] = step(model, optimizer, world, 2)
        name = f"saved-{world.size}.pt"
    else:
        path = list_checkpoints(out / "checkpoints")[-1]
        checkpoint_sharded.load_state(path)  # verified
        checkpoint_sharded.load_into(path, model, optimizer)
        saved = full_state(model, optimizer)
        saved["next_loss"] = step(model, optimizer, world, 2)
        name = f"loaded-{world.size}.pt"
    if world.main:
        torch.save(saved, out / name)
    if world.distributed:
        dist.barrier()  # leave together (distributed.Comm.close says why)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
