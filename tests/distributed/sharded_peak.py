"""One rank's steady-state peak of an FSDP2 step (2 gloo ranks), for the sharded prediction's
test (tests/unit/test_sharding_plan.py): argv = OUT.json, task (mlp | gpt), reshard (0|1),
micro-batch. The CPU tracker counts new storages; FSDP2 frees and re-allocates a block's
gathered parameters by resizing their storages in place, which no op reports, so the
resizes are added to the tracker's count here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param

sys.path.insert(0, str(Path(__file__).parents[1] / "tasks"))
from memgpt import MemGPT, WideMLP

from redline.memory.blocks import find_blocks
from redline.memory.sharding import shard_model
from redline.memory.sizes import live_tensor_bytes
from redline.memory.tracker import MemoryTracker

GPT_ARGS = {"seq": 128, "width": 64, "layers": 4}


def _counting_resizes(tracker: MemoryTracker) -> None:
    def adjust(delta: int) -> None:
        with tracker._lock:
            tracker._drain()
            tracker._live += delta
            tracker._peak = max(tracker._peak, tracker._baseline + tracker._live)

    alloc, free = fsdp_param.alloc_storage, fsdp_param.free_storage

    def alloc_storage(t: torch.Tensor) -> None:
        before = t.untyped_storage().size()
        alloc(t)
        adjust(t.untyped_storage().size() - before)

    def free_storage(t: torch.Tensor) -> None:
        before = t.untyped_storage().size()
        free(t)
        adjust(-before)

    fsdp_param.alloc_storage, fsdp_param.free_storage = alloc_storage, free_storage


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
    _counting_resizes(tracker)
    with tracker:
        step()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, tracker.peak)
    if rank == 0:
        Path(out).write_text(json.dumps({"peaks": peaks}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
