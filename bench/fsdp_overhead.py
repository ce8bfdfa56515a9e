"""FSDP against DDP on 2 ranks: step time and per-rank peak memory, redline and bare loops.

    PYTHONPATH=src:bench python bench/distributed_overhead.py --fsdp
        [--models states,activations] [--steps 10] [--repeats 7] [--launches 1]

One `torchrun --standalone --nproc-per-node 2` job per model and launch (gloo, 1 thread
per rank, each rank half of every step's batch, no accumulation). In it, per repeat, in
one random order both ranks draw alike (their collectives must match), a block of `steps`
steps of each variant:

  ddp-floor        the hand-written DDP loop: zero_grad, forward, backward (DDP's
                   all-reduce), clip_grad_norm_, fused AdamW step, scheduler step
  fsdp-floor       the hand-written FSDP2 loop: `fully_shard` on each block, then the root,
                   the optimizer built after (over the shards); the same step
  fsdp-floor-keep  the same with reshard_after_forward=False (gathered blocks kept from
                   forward to backward: one all-gather fewer per block, more memory)
  redline-ddp      `build_job` with distributed.strategy ddp, stepped by `JobRunner.step_on`
                   (the Engine with its OOM guard, as `redline train --nproc 2` steps)
  redline-fsdp     the same with distributed.strategy fsdp (memory/sharding.py)
  redline-ddp-ckpt redline-ddp with memory.activation_checkpointing full: the lever for
                   when activations dominate, for comparison

Time: rank 0's clock over each block (the blocks start together); a variant's cost is the
median over repeats of its block time over its floor's in the same repeat (paired), with a
distribution-free 95 % interval (pairs.median_ci).

Memory, each rank's, by redline's CPU storage tracker for every variant alike (the method
of bench/levers.py): after the timed blocks, `zero_grad(set_to_none=True)`, the baseline
is `live_tensor_bytes(model, optimizer)` (a DTensor counts its local shard: what this rank
holds between steps, `held`), and the peak is the tracker's over one more step. The
tracker hears FSDP2's gathered parameters, which FSDP allocates by resizing storages in
place (`_torch_compat.on_fsdp_storage_resize`). What it cannot see is added for the rows it
concerns: DDP keeps its gradients in buckets it allocated when it wrapped the model
(gradient_as_bucket_view=True, in both the bare loop and redline's), before the tracker
was entered, so the DDP rows add one gradient-sized buffer to the baseline.
Scratch space inside kernels and gloo's own buffers are not seen by any row.

Last, the collectives FSDP and DDP issue for a block, timed alone on one block's fp32
parameters (`collectives`): FSDP issues an all-gather in the forward, another in the
backward (reshard_after_forward) and a reduce-scatter; DDP one all-reduce.

Two models from tests/tasks/memgpt.py (MODELS): `states`, a residual MLP whose parameters
and AdamW state are most of a step's memory, and `activations`, a GPT at a sequence length
where the saved activations are.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairs import median_ci
from redline.device import DeviceInfo
from redline.memory.probe import live_tensor_bytes, measure_peak
from workloads import CLIP, LR

TASKS = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "memgpt.py"
CPU = DeviceInfo.detect("cpu")
# name -> (task class, task_args, the step's batch over both ranks, what dominates)
MODELS: dict[str, tuple[str, dict[str, int], int, str]] = {
    "states": ("WideMLP", {"n": 64, "dim": 64, "width": 512, "hidden": 2048, "layers": 4},
               16, "residual MLP 512-2048 x4, 8.4 M parameters: states dominate"),
    "activations": ("MemGPT", {"n": 64, "vocab": 128, "seq": 512, "width": 64, "layers": 4,
                               "heads": 4}, 8,
                    "GPT width 64 x4 layers, sequence 512, 0.2 M parameters: "
                    "activations dominate"),
}
VARIANTS = ("ddp-floor", "fsdp-floor", "fsdp-floor-keep", "redline-ddp", "redline-fsdp",
            "redline-ddp-ckpt")
FLOOR_OF = {"fsdp-floor": "ddp-floor", "fsdp-floor-keep": "fsdp-floor",
            "redline-ddp": "ddp-floor", "redline-fsdp": "fsdp-floor",
            "redline-ddp-ckpt": "redline-ddp"}


class Variant:
    """One way of stepping: `step()`, and what the tracker's baseline is made of."""

    def __init__(self, step: Callable[[], None], model: nn.Module,
                 optimizer: torch.optim.Optimizer, ddp: bool) -> None:
        self.step, self.model, self.optimizer, self.ddp = step, model, optimizer, ddp

    def peak(self) -> tuple[int, int]:
        """(held, peak) bytes of one step on this rank (module docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        base = live_tensor_bytes(self.model, self.optimizer)
        if self.ddp:  # its buckets: the gradients' bytes, allocated before the tracker
            base += sum(p.numel() * p.element_size() for p in self.model.parameters()
                        if p.requires_grad)
        return base, measure_peak(self.step, CPU, base).peak_bytes


def _task(key: str) -> Any:
    from redline.task import resolve_task

    cls, task_args, _, _ = MODELS[key]
    return resolve_task(f"{TASKS}:{cls}", task_args)


def _blocks(model: nn.Module) -> list[nn.Module]:
    from redline.memory.blocks import find_blocks

    return [b.module for b in find_blocks(model)]


def bare(task: Any, batch: Any, kind: str, reshard: bool = True) -> Variant:
    """The hand-written loop a user would write: DDP, or FSDP2 sharded block by block then
    the root, the optimizer created after `fully_shard` (before it, it would step the
    replaced tensors: accelerate #3394)."""
    torch.manual_seed(0)
    model = task.build_model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        stepped: nn.Module = DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block, reshard_after_forward=reshard)
        stepped = fully_shard(model, reshard_after_forward=reshard)
    opt = torch.optim.AdamW(stepped.parameters(), lr=LR, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task.loss(stepped, batch).backward()
        torch.nn.utils.clip_grad_norm_(stepped.parameters(), CLIP, foreach=True)
        opt.step()
        sched.step()

    return Variant(step, stepped, opt, kind == "ddp")


def redline(key: str, batch: Any, strategy: str, comm: Any, world: int,
            **settings: Any) -> Variant:
    """redline's path: build_job under torchrun (DDP, or shard_model) stepped by JobRunner;
    `settings`: more config keys."""
    from redline.config import RunConfig
    from redline.job.build import build_job
    from redline.job.runner import JobRunner

    cls, task_args, global_batch, _ = MODELS[key]
    config = RunConfig(task=f"{TASKS}:{cls}", task_args=dict(task_args)).updated({
        "device": "cpu", "precision.name": "fp32", "precision.compile": False,
        "data.num_workers": 0, "train.batch_size": global_batch // world,
        "train.effective_batch_size": global_batch, "train.lr": LR,
        "train.grad_clip": CLIP, "distributed.strategy": strategy, **settings})
    job = build_job(config, _task(key), CPU, comm=comm)
    runner = JobRunner(job)
    return Variant(lambda: runner.step_on(batch), job.step_model, job.optimizer,
                   strategy == "ddp")


def rank_part(args: argparse.Namespace) -> None:
    """One model's variants, on each rank of the torchrun job."""
    from redline.distributed import World, init

    torch.set_num_threads(1)
    world = World.from_env()
    comm = init(world, "cpu")
    task = _task(args.model)
    share = MODELS[args.model][2] // world.size
    data = task.train_data()
    batch = list(data[world.rank * share:(world.rank + 1) * share])
    made = {"ddp-floor": lambda: bare(task, batch, "ddp"),
            "fsdp-floor": lambda: bare(task, batch, "fsdp"),
            "fsdp-floor-keep": lambda: bare(task, batch, "fsdp", reshard=False),
            "redline-ddp": lambda: redline(args.model, batch, "ddp", comm, world.size),
            "redline-fsdp": lambda: redline(args.model, batch, "fsdp", comm, world.size),
            "redline-ddp-ckpt": lambda: redline(
                args.model, batch, "ddp", comm, world.size,
                **{"memory.activation_checkpointing": "full"})}
    variants = {name: made[name]() for name in args.variants.split(",")}
    for v in variants.values():  # warm-up: AdamW's state exists, redline's first checks
        for _ in range(max(2, args.steps // 2)):
            v.step()
    order = random.Random(args.seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            comm.agree(0)  # the blocks start together
            t = time.perf_counter()
            for _ in range(args.steps):
                variants[name].step()
            times[name].append(time.perf_counter() - t)
    memory = {name: v.peak() for name, v in variants.items()}
    block = max(sum(p.numel() for p in b.parameters()) for b in _blocks(task.build_model()))
    out = {"times": times, "steps": args.steps, "memory": memory, "rank": world.rank,
           "collectives": collectives(block, world.size, args.repeats), "block": block}
    Path(f"{args.out}.rank{world.rank}").write_text(json.dumps(out))


def collectives(numel: int, ranks: int, repeats: int) -> dict[str, float]:
    """Seconds (median of `repeats`) of each collective FSDP and DDP issue per block, on
    one block's fp32 parameters, over the default (gloo) group, in an order drawn alike."""
    import torch.distributed as dist

    numel -= numel % ranks
    whole, shard = torch.randn(numel), torch.randn(numel // ranks)
    ops = {"all-gather": lambda: dist.all_gather_into_tensor(torch.empty(numel), shard),
           "reduce-scatter": lambda: dist.reduce_scatter_tensor(shard, whole),
           "all-reduce": lambda: dist.all_reduce(whole)}
    times: dict[str, list[float]] = {name: [] for name in ops}
    order = random.Random(1)
    for _ in range(repeats):
        names = list(ops)
        order.shuffle(names)
        for name in names:
            dist.barrier()
            t = time.perf_counter()
            ops[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def launch(args: argparse.Namespace, key: str, out: str) -> list[dict[str, Any]]:
    """One torchrun job for model `key`: each rank's results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(["src", "bench", os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", __file__, "--part", "ranks", "--model", key,
           "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--variants", args.variants, "--seed", str(args.seed), "--out", out]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="of: " + ", ".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--launches", type=int, default=1, help="torchrun jobs per model")
    p.add_argument("--timeout", type=float, default=900, help="seconds per torchrun job")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("ranks",), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.part == "ranks":
        return rank_part(args)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    unknown |= {"model " + m for m in set(args.models.split(",")) - set(MODELS)}
    if unknown:
        raise SystemExit(f"unknown {sorted(unknown)}: models {list(MODELS)}, "
                         f"variants {list(VARIANTS)}")
    results: dict[str, list[list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, key in itertools.product(range(args.launches), args.models.split(",")):
            args.seed = i
            results.setdefault(key, []).append(launch(args, key, f"{tmp}/{key}-{i}"))
            print(f"{key}: launch {i + 1}/{args.launches} done", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[list[dict[str, Any]]]]) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {CPU.name}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {load:.1f} at the end; 2 ranks (gloo, "
          f"1 thread each), {args.steps}-step blocks, {args.repeats} repeats x "
          f"{args.launches} launch(es)")
    mib = 2 ** 20
    for key, launches in results.items():
        print(f"\n{key}: {MODELS[key][3]}; batch {MODELS[key][2]} per step, "
              f"{MODELS[key][2] // 2} per rank")
        times: dict[str, list[float]] = {}
        for ranks in launches:  # rank 0's clock
            for name, values in ranks[0]["times"].items():
                times.setdefault(name, []).extend(v / args.steps for v in values)
        print(f"{'variant':<16} {'ms/step':>8} {'[min, max]':>16} {'vs':>11} {'ratio':>6} "
              f"{'95% interval':>14} {'held r0/r1 MiB':>17} {'peak r0/r1 MiB':>15}")
        for name, values in times.items():
            ms = [1e3 * v for v in values]
            floor = FLOOR_OF.get(name)
            if floor in times:
                med, lo, hi = median_ci([a / b for a, b in zip(values, times[floor],
                                                                   strict=True)])
                cost = f"{floor:>11} {med:6.2f} {f'{lo:.2f}..{hi:.2f}':>14}"
            else:
                cost = f"{'-':>11} {'-':>6} {'-':>14}"
            mem = [ranks[r]["memory"][name] for ranks in launches[-1:] for r in range(2)]
            held = "/".join(f"{m[0] / mib:.1f}" for m in mem)
            peaks = "/".join(f"{m[1] / mib:.1f}" for m in mem)
            print(f"{name:<16} {statistics.median(ms):8.1f} "
                  f"{f'[{min(ms):.1f}, {max(ms):.1f}]':>16} {cost} {held:>17} {peaks:>15}")
        ops = launches[-1][0]["collectives"]
        print(f"one block's {launches[-1][0]['block'] * 4 / mib:.1f} MiB over gloo, median of "
              f"{args.repeats}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in ops.items()))


if __name__ == "__main__":
    main()
