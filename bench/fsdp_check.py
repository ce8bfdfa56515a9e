"""FSDP2 under torchrun, checked end to end: bench/gpu_check.py's FSDP run (NCCL or gloo).

    torchrun --standalone --nproc-per-node N bench/fsdp_check.py DEVICE CKPT_DIR OUT_JSON

DEVICE is cpu (gloo) or cuda (each rank its cuda:LOCAL_RANK, NCCL; one rank on one GPU is
allowed: NCCL refuses two ranks on one device). On every rank:

1. A sharded step against one process. tests/tasks/memgpt.py's MemGPT is sharded the way
   redline shards it (memory/sharding.py `shard_model`: each block, then the root), fused
   AdamW is built after, and redline's Engine steps this rank's share of a batch in two
   micro-batches (set_requires_gradient_sync(False) until the last: engine/ranks.py). A plain
   copy of the model steps the whole batch in one process. The loss (averaged over the
   ranks) and every gradient (gathered with `full_tensor()`) must agree within fp32
   rounding, every parameter after the AdamW step within 1 % of its learning rate.
2. A torch.distributed.checkpoint round trip: `get_state_dict` of the sharded model and
   optimizer, `dcp.save` into CKPT_DIR (every rank writes its shards), one more step (the
   "next step"), then `dcp.load` + `set_state_dict`: every parameter's and optimizer
   state's local shard must equal the saved one exactly, and the step replayed from the
   loaded state must give the next step's loss again.

Rank 0 writes the figures to OUT_JSON; any rank raises on a mismatch (exit status 1).
`checks` runs it (and `redline train --nproc 2 --set distributed.strategy=fsdp`) for
gpu_check.py.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MEMGPT = Path(__file__).resolve().parents[1] / "tests" / "tasks" / "memgpt.py"
SHAPE = {"n": 16, "vocab": 128, "seq": 64, "width": 64, "layers": 4, "heads": 4}
BATCH, LR = 8, 1e-3  # the whole step's batch; each rank steps BATCH / world


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: call on all ranks)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of this rank's parameter shards and optimizer-state shards, in a fixed order."""
    tensors = [_local(p.detach()) for p in model.parameters()]
    for p in model.parameters():
        for _, v in sorted(optimizer.state[p].items()):
            if isinstance(v, torch.Tensor):
                tensors.append(_local(v))
    return [t.clone() for t in tensors]


def main(device_kind: str, ckpt: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from redline.distributed import World, init
    from redline.engine import Engine
    from redline.memory.blocks import find_blocks
    from redline.memory.sharding import is_sharded, shard_model
    from redline.task import resolve_task

    world = World.from_env()
    if device_kind == "cuda":
        torch.cuda.set_device(world.local_rank)
    device = torch.device(device_kind, world.local_rank if device_kind == "cuda" else None)
    if world.distributed:
        comm = init(world, device_kind)
    else:  # one rank (one GPU): redline joins no group, FSDP still needs one
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=300))
        comm = None
    backend = dist.get_backend()
    task = resolve_task(f"{MEMGPT}:MemGPT", SHAPE)
    batch = [t.to(device) for t in task.train_data()[:BATCH]]
    share = BATCH // world.size
    mine = [t[world.rank * share:(world.rank + 1) * share] for t in batch]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return task.build_model().to(device)

    alone = build()
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=LR, fused=True)
    alone_loss = Engine(alone, alone_opt, "fp32", grad_clip=None).step(batch, task.loss)

    model = build()
    shard_model(model, find_blocks(model), "fp32")
    assert is_sharded(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)  # after sharding
    engine = Engine(model, optimizer, "fp32", grad_clip=None,
                    micro_batch_size=max(1, share // 2), comm=comm)
    loss = engine.step(mine, task.loss).detach().clone()
    dist.all_reduce(loss)  # each rank's share weighs the same
    loss /= world.size
    grad_diff = param_diff = 0.0
    for p, q in zip(model.parameters(), alone.parameters(), strict=True):
        g, w = _full(p.grad), _full(p.detach())
        torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-6)
        # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps, fp32 rounding
        # of g moves the update by a share of lr, so parameters agree to a share of lr
        torch.testing.assert_close(w, q.detach(), rtol=1e-5, atol=1e-2 * LR)
        grad_diff = max(grad_diff, (g - q.grad).abs().max().item())
        param_diff = max(param_diff, (w - q.detach()).abs().max().item())
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-6)

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    saved = _snapshot(model, optimizer)
    next_loss = engine.step(mine, task.loss).item()  # moves everything away from `saved`
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = _snapshot(model, optimizer)
    assert len(loaded) == len(saved), (len(loaded), len(saved))
    unequal = sum(not torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))
    assert unequal == 0, f"{unequal} of {len(saved)} tensors differ after the DCP round trip"
    replayed = engine.step(mine, task.loss).item()
    assert abs(replayed - next_loss) <= 1e-6 * abs(next_loss), (replayed, next_loss)
    if world.main:
        Path(out).write_text(json.dumps({
            "backend": backend, "world": world.size, "loss": loss.item(),
            "alone_loss": alone_loss.item(), "grad_diff": grad_diff,
            "param_diff": param_diff, "tensors_round_tripped": len(saved),
            "next_loss": next_loss, "replayed_loss": replayed}))
    dist.barrier()
    if comm is not None:
        comm.close()
    else:
        dist.destroy_process_group()


def checks(check: Callable[[str], Callable[[Callable[[], str]], Any]], info: Any) -> None:
    """gpu_check.py's FSDP lines, each registered with its `check` decorator, on `info`'s
    device (a redline DeviceInfo): this script under torchrun, one rank per GPU up to 2
    over NCCL (2 over gloo on a CPU), then `redline train --nproc 2` with
    distributed.strategy=fsdp (skipped on one GPU)."""
    gpus = torch.cuda.device_count() if info.is_cuda else 0
    nproc = min(gpus, 2) if info.is_cuda else 2
    backend = "NCCL" if info.is_cuda else "gloo"

    @check(f"FSDP, {nproc} rank(s) over {backend}: sharded step = one process, DCP round trip")
    def _() -> str:
        script = Path(__file__).resolve()
        with tempfile.TemporaryDirectory() as d:
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc), str(script), info.kind, f"{d}/ckpt",
                 f"{d}/out.json"],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            r = json.loads(Path(f"{d}/out.json").read_text())
        assert r["backend"] == backend.lower() and r["world"] == nproc, r
        return (f"ok, loss {r['loss']:.6f} (one process {r['alone_loss']:.6f}), largest "
                f"difference: gradient {r['grad_diff']:.1e}, parameter {r['param_diff']:.1e}; "
                f"{r['tensors_round_tripped']} parameter and state shards equal after "
                f"dcp.save/load, next-step loss {r['next_loss']:.6f} replayed "
                f"{r['replayed_loss']:.6f}")

    if info.is_cuda and nproc < 2:
        @check("FSDP, 2 ranks over NCCL, and redline train with distributed.strategy=fsdp")
        def _() -> str:
            return ("skipped: one GPU (NCCL refuses two ranks on one device); the 1-rank "
                    "NCCL run above shards and checkpoints, and --device cpu runs 2 ranks "
                    "over gloo")
        return

    @check(f"redline train --nproc 2, distributed.strategy=fsdp, over {backend}")
    def _() -> str:
        with tempfile.TemporaryDirectory() as d:
            done = subprocess.run(
                [sys.executable, "-m", "redline", "train", f"{MEMGPT}:MemGPT", "--nproc", "2",
                 "--steps", "20", "--device", info.kind, "--no-progress", "--no-report",
                 "--run-dir", f"{d}/run", "--set", "distributed.strategy=fsdp",
                 "--set", "telemetry.log_every=5", "--set", "train.batch_size=4",
                 "--set", "train.effective_batch_size=8"],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            rows = [json.loads(line) for line in
                    Path(f"{d}/run/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            ranks = {json.loads(line)["rank"]
                     for line in Path(f"{d}/run/ranks.jsonl").read_text().splitlines()}
        assert [r["step"] for r in rows] == [5, 10, 15, 20] and ranks == {0, 1}, rows
        assert rows[-1]["loss"] < rows[0]["loss"], "loss did not fall"
        if info.is_cuda:
            assert all(r["redline/host_syncs"] == 0 for r in rows[:-1]), rows
        return (f"ok, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
                f"{rows[-1]['samples_per_s']:.0f} samples/s"
                + (", no telemetry host sync" if info.is_cuda else ""))


if __name__ == "__main__":
    main(*sys.argv[1:4])
