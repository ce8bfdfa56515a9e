"""What redline adds under torchrun, and what 2 ranks give over one process.

    PYTHONPATH=src:bench python bench/distributed_overhead.py [--width 512] [--batch 176]
        [--steps 50] [--repeats 21] [--launches 3]

Part 1, inside one `torchrun --standalone --nproc-per-node 2` job (gloo, 1 thread per
rank, each rank half of every batch): per repeat, in one random order that both ranks
draw alike (their collectives must match), a block of `steps` steps of each variant:

  ddp-floor   the hand-written DDP loop: zero_grad, forward, backward (DDP's all-reduce),
              clip_grad_norm_, AdamW step, scheduler step
  +agree      the same plus one `Comm.agree` a step, where redline makes it (before the
              last backward): the agreement alone
  redline     Engine.step (OOM guard on, every forward under no_sync, the agreement, the
              armed all-reduce) + Telemetry.record_step (jsonl; a window every 50 steps,
              whose close gathers every rank's figures once)
  no-guard    the same with memory.oom_guard: false: no per-step agreement (a stop is
              agreed at the next window)

A variant's cost is the median over repeats of its block time over ddp-floor's in the
same repeat (paired), with a distribution-free 95 % interval (overhead.paired). Rank 0's
clock times the blocks; the ranks are in lockstep.

Part 2, separate launches alternated (single, torchrun, single, ...; not interleaved
within one process, so the spread is launch to launch): samples/s of one process with 2
threads stepping the whole batch (the floor loop and redline's Engine + Telemetry)
against part 1's 2-rank figures on the same 2 cores.

FSDP against DDP (`--fsdp`, bench/fsdp_overhead.py, whose options follow it): the
hand-written DDP and FSDP2 loops and redline's ddp and fsdp strategies, interleaved in one
torchrun job per model (one whose states dominate, one whose activations do): step time
and each rank's peak memory from redline's CPU storage tracker.

    PYTHONPATH=src:bench python bench/distributed_overhead.py --fsdp [--steps 10]
        [--repeats 7] [--launches 1] [--models states,activations]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
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

from pairs import paired
from redline.distributed import Comm, World, init
from redline.engine import Engine
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.session import Telemetry
from workloads import CLIP, LR, mlp

FLOOR = "ddp-floor"
Step = Callable[[], None]


def _floor(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, data: list[Any],
           comm: Comm | None = None) -> Step:
    it = itertools.cycle(data)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x, y = next(it)
        loss = nn.functional.mse_loss(model(x), y)
        if comm is not None:
            comm.agree(0, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        sched.step()

    return step


def _redline(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, data: list[Any],
             comm: Comm, global_batch: int, run_dir: Path, guard: bool = True
             ) -> tuple[Step, Telemetry]:
    it, k = itertools.cycle(data), itertools.count(1)
    share = data[0][0].shape[0]
    engine = Engine(model, opt, "fp32", scheduler=sched, grad_clip=CLIP,
                    micro_batch_size=share, oom_guard=guard, comm=comm)
    telemetry = Telemetry(run_dir, TelemetryConfig(trackers=("jsonl",), log_every=50),
                          samples_per_step=global_batch, device="cpu", comm=comm,
                          sync_wait=lambda: engine.sync_wait_s)
    telemetry.start()

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1])

    def step() -> None:
        loss = engine.step(next(it), loss_fn)
        telemetry.record_step(next(k), loss, engine.grad_norm, share, LR)

    return step, telemetry


def _blocks(variants: dict[str, Step], steps: int, repeats: int, seed: int,
            barrier: Callable[[], None]) -> dict[str, list[float]]:
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm-up
        for _ in range(steps // 2):
            step()
    for _ in range(repeats):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            barrier()
            t = time.perf_counter()
            for _ in range(steps):
                variants[name]()
            times[name].append(time.perf_counter() - t)
    return times


def rank_part(args: argparse.Namespace) -> None:
    """Part 1, on each rank of the torchrun job."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    world = World.from_env()
    comm = init(world, "cpu")
    w = mlp(args.width, args.batch, "mlp")
    half = args.batch // world.size
    data = [(x[world.rank * half:(world.rank + 1) * half],
             y[world.rank * half:(world.rank + 1) * half]) for x, y in w.data]
    ddp = DistributedDataParallel(w.model)
    with tempfile.TemporaryDirectory() as tmp:
        step, telemetry = _redline(ddp, w.optimizer, w.scheduler, data, comm,
                                   args.batch, Path(tmp) / "run")
        unguarded, telemetry2 = _redline(ddp, w.optimizer, w.scheduler, data, comm,
                                         args.batch, Path(tmp) / "run2", guard=False)
        variants = {FLOOR: _floor(ddp, w.optimizer, w.scheduler, data),
                    "+agree": _floor(ddp, w.optimizer, w.scheduler, data, comm),
                    "redline": step, "no-guard": unguarded}
        times = _blocks(variants, args.steps, args.repeats, 0,
                        lambda: comm.agree(0))  # blocks start together
        telemetry.close()
        telemetry2.close()
    if world.main:
        Path(args.out).write_text(json.dumps({"times": times, "steps": args.steps}))


def single_part(args: argparse.Namespace) -> None:
    """Part 2's one process: the whole batch, 2 threads."""
    torch.set_num_threads(2)
    w = mlp(args.width, args.batch, "mlp")
    with tempfile.TemporaryDirectory() as tmp:
        step, telemetry = _redline(w.model, w.optimizer, w.scheduler, w.data,
                                   Comm(World()), args.batch, Path(tmp) / "run")
        variants = {"floor": _floor(w.model, w.optimizer, w.scheduler, w.data),
                    "redline": step}
        times = _blocks(variants, args.steps, max(5, args.repeats // 3), 0, lambda: None)
        telemetry.close()
    Path(args.out).write_text(json.dumps({"times": times, "steps": args.steps}))


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(["src", "bench", os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    if "--fsdp" in sys.argv[1:]:
        import fsdp_overhead

        return fsdp_overhead.main([a for a in sys.argv[1:] if a != "--fsdp"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=176, help="the whole step's batch")
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--launches", type=int, default=3, help="part 2: launches of each kind")
    p.add_argument("--fsdp", action="store_true",  # handled above: its own options
                   help="FSDP against DDP instead (bench/fsdp_overhead.py; --fsdp --help)")
    p.add_argument("--part", choices=("ranks", "single"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part == "ranks":
        return rank_part(args)
    if args.part == "single":
        return single_part(args)
    me = [sys.executable, __file__, "--width", str(args.width), "--batch", str(args.batch),
          "--steps", str(args.steps), "--repeats", str(args.repeats)]
    results: dict[str, list[dict[str, Any]]] = {"single": [], "ranks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.launches):
            out = f"{tmp}/single-{i}.json"
            _run([*me, "--part", "single", "--out", out])
            results["single"].append(json.loads(Path(out).read_text()))
            out = f"{tmp}/ranks-{i}.json"
            _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", *me[1:], "--part", "ranks", "--out", out])
            results["ranks"].append(json.loads(Path(out).read_text()))
            print(f"launch {i + 1}/{args.launches} done", file=sys.stderr, flush=True)
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; MLP {args.width}, batch {args.batch} per step, "
          f"{args.steps}-step blocks")
    print(f"\npart 1: 2 ranks (gloo, 1 thread each), {args.repeats} repeats x "
          f"{args.launches} launches, cost against {FLOOR} (paired)")
    times: dict[str, list[float]] = {}
    for r in results["ranks"]:
        for name, values in r["times"].items():
            times.setdefault(name, []).extend(values)
    floor_ms = statistics.median(times[FLOOR]) / args.steps * 1000
    print(f"{'variant':<12} {'ms/step':>8} {'cost':>9} {'95% interval':>18}")
    print(f"{FLOOR:<12} {floor_ms:8.2f} {'-':>9} {'-':>18}")
    for name in ("+agree", "redline", "no-guard"):
        med, lo, hi = paired(times, name, FLOOR)
        ms = statistics.median(times[name]) / args.steps * 1000
        print(f"{name:<12} {ms:8.2f} {100 * (med - 1):+8.2f}% "
              f"[{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}] %")
    print("\npart 2: samples/s, one process (2 threads) against 2 ranks (1 thread each); "
          "median [min, max] over launches")

    def rates(kind: str, name: str) -> list[float]:
        return [args.batch * args.steps / statistics.median(r["times"][name])
                for r in results[kind]]

    rows = [("bare loop", rates("single", "floor"), rates("ranks", FLOOR)),
            ("redline", rates("single", "redline"), rates("ranks", "redline"))]
    for label, one, two in rows:
        print(f"{label:<10} 1 process {statistics.median(one):9.1f} [{min(one):.1f}, "
              f"{max(one):.1f}]   2 ranks {statistics.median(two):9.1f} [{min(two):.1f}, "
              f"{max(two):.1f}]   {statistics.median(two) / statistics.median(one):.2f}x")


if __name__ == "__main__":
    main()
