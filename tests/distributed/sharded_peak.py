"""One rank's steady-state peak of an FSDP2 step (2 gloo ranks), for the sharded prediction's
test (tests/unit/test_sharding_plan.py): argv = OUT.json, task (mlp | gpt), reshard (0|1),
micro-batch. The CPU tracker counts FSDP2's in-place storage resizes (a block's gathered
parameters freed and gathered again) and a DTensor's local shard (memory/tracker.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "tasks"))
from memgpt import MemGPT, WideMLP

from redline.memory.blocks import find_blocks
from redline.memory.sharding import shard_model
from redline.memory.sizes import live_tensor_bytes
from redline.memory.tracker import MemoryTracker

GPT_ARGS = {"seq": 128, "width": 64, "layers": 4}


def main() -> None:
    out, which, reshard, micro = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    task = WideMLP() if which == "mlp" else MemGPT(**GPT_ARGS)
    model = task.build_model()
    shard_model(model, find_blocks(model), "fp32", reshard_after_forward=reshard)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = [t[rank * micro:(rank + 1) * micro] for t in task.train_data().tensors]

    def step() -> None:
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on: the steady state
    tracker = MemoryTracker(baseline=live_tensor_bytes(
        [list(model.parameters()), list(opt.state.values())]))
    with tracker:
        step()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, tracker.peak)
    if rank == 0:
        Path(out).write_text(json.dumps({"peaks": peaks}))
    dist.barrier()  # leave together (distributed.Comm.close says why)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
