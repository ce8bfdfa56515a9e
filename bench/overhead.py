"""What the trainer costs: `Trainer.fit` itself against a hand-written loop doing the same math.

    PYTHONPATH=src python bench/overhead.py [--workloads conv-bn,mlp-small,mlp-groups,mlp-large]
        [--repeats 5,5,5,3] [--steps 200] [--warmup 50] [--threads 1]
        [--small 128x160] [--large 512x176] [--clock wall] [--profile conv-bn]

Goal: `Trainer.fit`, as a user runs it (the defaults: OOM guard on, inspector every 200
steps, checkpoints every 500, progress off as under a pipe; every tracker on: jsonl,
tensorboard, wandb offline), within 0.5 % of a hand-written PyTorch loop on every step
of 1 ms or more, and the run's own `redline/overhead_pct` within a factor of 2 of what is
measured here. Pass/fail is printed as measured.

The hand loop does the same math on the same objects: the same model object (the task
hands out the workload's one model, so both step the same tensors at the same
addresses), a fresh fused AdamW at the same lr and weight decay (the workload's three
parameter groups on mlp-groups), the same gradient clipping (clip_grad_norm_ at 1.0,
foreach), the same constant LambdaLR stepped each step, and the same batches in the same
order: a DataLoader over the same dataset with a sampler written here that draws redline's
documented order (a permutation per epoch from a generator seeded with seed * 1000003 +
epoch, data.py), as a user's loop would read a TensorDataset (redline reads it a batch
at a time: data.py, so its loading costs less than the hand loop's). A third side,
`hand loop, batches pre-made`, is the floor: the same loop with no loading at all (its
batches made before the timed steps). `--inspect-off` adds `Trainer.fit, inspect.every
0`: what the inspector's statistics every 200 steps cost. Before the first workload one
short fit pays what a process pays once (imports, pyarrow's and W&B's first use); it is
not counted.

How a step is timed, and why this way. Each side's per-step time is read from a clock
stamped at the end of every optimizer step: in the trainer by a user callback on
STEP_END (the public hook a user's own timer would use), in the hand loop at the same
point; the time from the end of step `warmup` to the end of step `warmup + steps`,
divided by `steps`. Everything the trainer does per step lies between two stamps: the
next batch, BATCH_START handlers, Engine.step, STEP_END handlers, Telemetry.record_step
with its window closes, the inspector's step every 200, epoch changes. Set-up (the run
directory, the writer process, W&B's init, FLOP counting, the first steps' memory check)
and tear-down are outside, as they should be for a per-step figure: they are paid once.
The other two ways were rejected. The difference of two fits of N and 2N steps measures
the same thing in principle, but each fit's set-up and tear-down (a writer process
spawned, W&B started and synced to its offline files) take seconds and vary by hundreds
of milliseconds on a loaded machine (measured: set-up 0.2..1.1 s, tear-down 5.9..6.7 s),
more than the whole effect over a few hundred steps; the difference of two noisy totals
is noise.
The step time in metrics.jsonl is the trainer's own clock: it is what is being checked
(like `redline/overhead_pct`), so it cannot be the judge.

`--steps` should be a multiple of 200 (the inspector's and the window's common period),
so the timed span holds each periodic cost in its steady-state share. Each repeat runs
every side once, in a random order; a side's cost is the median over repeats of the
paired ratio side / hand loop (the machine's drift cancels within a repeat), with a
distribution-free 95 % confidence interval and the spread of the repeats. The same run
prints the run's self-reported `redline/overhead_pct` (median over the timed windows of
each fit, then over fits), in % and in us a step, beside the measured figure.

`--clock cpu` stamps the training thread's CPU time instead of the wall clock: on a
loaded machine wall time mostly measures the other processes (it leaves out the writer
process, which on an idle machine runs on another core). `--profile NAME` instead runs
one fit and one hand loop of NAME under cProfile and prints redline's functions by
cumulative time, and the functions called at least once a step by how much more of
their own time the fit spends than the hand loop (cProfile inflates small calls: compare
call counts and shares, not microseconds).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from pairs import median_ci
from redline.config import RunConfig, TrainConfig
from redline.events import Callback, State
from redline.inspector import InspectConfig
from redline.run.trainer import Trainer
from redline.telemetry.config import TelemetryConfig
from workloads import CLIP, LR, Workload, build

TRACKERS = ("jsonl", "tensorboard", "wandb")
HAND, FIT, NO_INSPECT = "hand loop", "Trainer.fit", "Trainer.fit, inspect.every 0"
PREMADE = "hand loop, batches pre-made"
SIDES = [HAND, FIT, PREMADE]  # --inspect-off adds NO_INSPECT
GOAL_PCT, FACTOR = 0.5, 2.0
CLOCK = [time.perf_counter]  # --clock cpu: time.thread_time
SEED, WEIGHT_DECAY, EPOCH_BATCHES = 0, 0.01, 64


class Stamps(Callback):
    """A clock read at the end of every optimizer step (what a user's timer would do)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def on_step_end(self, state: State, loss: torch.Tensor) -> None:
        self.t.append(CLOCK[0]())


class BenchTask:
    """The workload as a redline Task: its one model, a dataset of EPOCH_BATCHES batches."""

    def __init__(self, w: Workload, dataset: TensorDataset, groups: bool) -> None:
        self.name, self.w, self.dataset, self.groups = "bench", w, dataset, groups

    def build_model(self) -> torch.nn.Module:
        return self.w.model

    def train_data(self) -> TensorDataset:
        return self.dataset

    def eval_data(self) -> None:
        return None

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.w.loss(model, batch)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer | None:
        return _optimizer(self.w) if self.groups else None  # None: redline's fused AdamW


def _optimizer(w: Workload) -> torch.optim.Optimizer:
    """A fresh optimizer like the workload's: its parameter groups, fused AdamW."""
    groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
              for g in w.optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


class Order(Sampler[list[int]]):
    """redline's documented batch order (data.py), written out for the hand loop."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch, self.epoch = n, batch, 0

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator()
        g.manual_seed(SEED * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch]


def hand_loop(w: Workload, dataset: TensorDataset, steps: int, groups: bool,
              premade: bool = False) -> list[float]:
    """The same math as the trainer's step, written by hand; the stamp after each step.
    `premade`: the epoch's batches made before it starts, out of the timed steps (the
    floor: no loading at all)."""
    model, loss_fn = w.model, w.loss
    opt = (_optimizer(w) if groups else
           torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    sampler = Order(len(dataset), w.batch_size)
    loader: Any = DataLoader(dataset, batch_sampler=sampler)
    if premade:
        made = {e: list(_epoch(loader, sampler, e)) for e in range(steps // len(sampler) + 1)}
        loader = None
    stamps: list[float] = []
    step = 0
    while step < steps:
        for batch in (made[sampler.epoch] if premade else loader):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
            opt.step()
            sched.step()
            stamps.append(CLOCK[0]())
            step += 1
            if step == steps:
                break
        sampler.epoch += 1
    return stamps


def _epoch(loader: DataLoader, sampler: Order, epoch: int) -> Iterator[Any]:
    sampler.epoch = epoch
    yield from loader
    sampler.epoch = 0


def fit(w: Workload, dataset: TensorDataset, steps: int, groups: bool, run_dir: Path,
        inspect: bool = True) -> tuple[list[float], list[dict[str, Any]]]:
    """One `Trainer.fit` as a user runs it (`inspect` False: inspect.every 0); its step
    stamps and its window records."""
    config = RunConfig(device="cpu", train=TrainConfig(
        steps=steps, batch_size=w.batch_size, lr=LR, weight_decay=WEIGHT_DECAY, seed=SEED,
        grad_clip=CLIP), telemetry=TelemetryConfig(trackers=TRACKERS, wandb_mode="offline"),
        inspect=InspectConfig(every=InspectConfig().every if inspect else 0))
    stamps = Stamps()
    Trainer(config, task=BenchTask(w, dataset, groups), run_dir=run_dir,  # type: ignore[arg-type]
            callbacks=[stamps], progress=None).fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return stamps.t, [r for r in rows if "redline/overhead_pct" in r]


def dataset_for(w: Workload) -> TensorDataset:
    """EPOCH_BATCHES batches' worth of samples (the workload's batches, repeated)."""
    x = torch.cat([b[0] for b in w.data])
    y = torch.cat([b[1] for b in w.data])
    reps = math.ceil(EPOCH_BATCHES / len(w.data))
    return TensorDataset(x.repeat(reps, *[1] * (x.dim() - 1)),
                         y.repeat(reps, *[1] * (y.dim() - 1)))


def per_step(stamps: list[float], warmup: int, steps: int) -> float:
    return (stamps[warmup + steps - 1] - stamps[warmup - 1]) / steps


def bench(w: Workload, key: str, reps: int, args: argparse.Namespace, tmp: Path
          ) -> dict[str, Any]:
    groups, total = key == "mlp-groups", args.warmup + args.steps + 10
    dataset = dataset_for(w)
    sides = [*SIDES, *([NO_INSPECT] if args.inspect_off else [])]
    times: dict[str, list[float]] = {side: [] for side in sides}
    pct: list[float] = []
    order = random.Random(0)
    for rep in range(reps):
        for side in order.sample(sides, len(sides)):
            torch.set_num_threads(args.threads)
            if side in (HAND, PREMADE):
                stamps = hand_loop(w, dataset, total, groups, premade=side == PREMADE)
            else:
                run_dir = tmp / f"{key}-{sides.index(side)}-{rep}"
                stamps, rows = fit(w, dataset, total, groups, run_dir, inspect=side == FIT)
                if side == FIT:
                    pct.append(statistics.median(
                        r["redline/overhead_pct"] for r in rows
                        if args.warmup < r["step"] <= args.warmup + args.steps))
            times[side].append(per_step(stamps, args.warmup, args.steps))
    return {"times": times, "pct": pct, "ratio": {side: median_ci(
        [f / h for f, h in zip(times[side], times[HAND], strict=True)]) for side in sides}}


def profile(w: Workload, key: str, args: argparse.Namespace, tmp: Path) -> None:
    """cProfile one fit and one hand loop of as many steps; print the per-step functions
    (called at least once a step) by how much more of their own time the fit spends."""
    dataset, total, groups = dataset_for(w), args.warmup + args.steps + 10, key == "mlp-groups"
    fit(w, dataset, total, groups, tmp / "warm")
    hand_loop(w, dataset, total, groups)
    per: list[dict[str, tuple[float, float, int]]] = []
    for side in ("fit", "hand"):
        prof = cProfile.Profile()
        prof.enable()
        if side == "fit":
            fit(w, dataset, total, groups, tmp / "profiled")
        else:
            hand_loop(w, dataset, total, groups)
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        per.append({f"{Path(f).parent.name}/{Path(f).name}:{ln} {name}":
                    (tt / total * 1e6, ct / total * 1e6, nc)
                    for (f, ln, name), (_, nc, tt, ct, _) in stats.items()})
    fitted, hand = per
    rows = []
    everything = sorted(fitted.items(), key=lambda kv: -kv[1][1])
    print("redline's functions in the fit, by cumulative time (set-up included), per step:")
    for where, (tt, ct, nc) in everything[:400]:
        if where.startswith(("redline/", "run/", "telemetry/", "memory/", "job/")):
            print(f"  {ct:9.1f} us cumulative  {tt:7.1f} own  {nc:6d} calls  {where}")
    for where, (tt, ct, nc) in fitted.items():
        if nc < 0.9 * total:
            continue  # set-up, or rarer than once a step
        h_tt, _, h_nc = hand.get(where, (0.0, 0.0, 0))
        rows.append((tt - h_tt, tt, ct, nc / total, h_nc / total, where))
    print(f"per step ({total} steps), fit minus hand loop, own time (cProfile's clock: "
          "inflated, compare shares):")
    print("  diff us   own us   cumul us  calls/step fit  hand  function")
    for d, tt, ct, nf, nh, where in sorted(rows, reverse=True)[:args.top]:
        print(f"  {d:7.1f}  {tt:7.1f}  {ct:9.1f}  {nf:6.1f}  {nh:6.1f}  {where}")
    print("redline's own per-step functions, by cumulative time per step:")
    for _d, tt, ct, nf, _nh, where in sorted(rows, key=lambda r: -r[2]):
        if where.startswith(("redline/", "run/", "telemetry/", "memory/", "bench/overhead")):
            print(f"  {ct:9.1f} us cumulative  {tt:7.1f} own  {nf:6.1f}/step  {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="conv-bn,mlp-small,mlp-groups,mlp-large",
                   help="comma-separated, from bench/workloads.py")
    p.add_argument("--repeats", default="5,5,5,3",
                   help="repeats per workload, in the same order (one value: all)")
    p.add_argument("--steps", type=int, default=200,
                   help="timed steps per run; a multiple of 200 (module docstring)")
    p.add_argument("--warmup", type=int, default=50, help="steps before the timed span")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", default="128x160", help="mlp-small's WIDTHxBATCH, ~2 ms")
    p.add_argument("--large", default="512x176", help="mlp-large's WIDTHxBATCH, ~15-30 ms")
    p.add_argument("--profile", metavar="WORKLOAD",
                   help="profile one fit of this workload with cProfile instead")
    p.add_argument("--top", type=int, default=60, help="rows --profile prints")
    p.add_argument("--inspect-off", action="store_true",
                   help="also time Trainer.fit with inspect.every 0 (what inspection costs)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the training thread's CPU time (time.thread_time), for a "
                        "loaded machine, where wall time mostly measures the other "
                        "processes; it leaves out the writer process and waits")
    args = p.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.thread_time
    with tempfile.TemporaryDirectory(prefix="redline-overhead-",
                                     ignore_cleanup_errors=True) as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp)
        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        torch.set_float32_matmul_precision("highest")  # what redline's fp32 policy pins
        if args.profile:
            profile(build([args.profile], args.small, args.large)[0], args.profile, args,
                    Path(tmp))
            return
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    import wandb

    keys = args.workloads.split(",")
    repeats = [int(s) for s in args.repeats.split(",")]
    repeats = (repeats * len(keys))[:len(keys)] if len(repeats) == 1 else repeats
    assert len(repeats) == len(keys), "one --repeats value per workload"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; Python "
          f"{platform.python_version()}, torch {torch.__version__}, wandb {wandb.__version__};"
          f" {args.threads} thread(s), {args.clock} clock; per repeat each side once, in a "
          f"random order; {args.steps} steps timed after {args.warmup}", flush=True)
    t_start, rows, verdicts = time.perf_counter(), [], []
    workloads = build(keys, args.small, args.large)
    # What a process pays once (imports, pyarrow's and W&B's first use, the writer's first
    # start): paid here, in a short fit whose last step is inspected, and not counted.
    fit(workloads[0], dataset_for(workloads[0]), 60, keys[0] == "mlp-groups", tmp / "warm-up")
    for w, key, reps in zip(workloads, keys, repeats, strict=True):
        res = bench(w, key, reps, args, tmp)
        rows += _rows(w.name, res)
        verdicts.append(_verdict(w.name, res))
    print("\n| workload | side | median ms/step | spread (min..max) | vs hand loop, paired "
          "median (95 % CI) | us/step | redline/overhead_pct (us/step) |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print("\n" + "\n".join(verdicts))
    print(f"\nload {os.getloadavg()[0]:.2f} at the end; total "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)


def _rows(name: str, res: dict[str, Any]) -> list[str]:
    hand = statistics.median(res["times"][HAND])
    out = []
    for side, ts in res["times"].items():
        r, lo, hi = res["ratio"][side]
        own = ""
        if side == FIT:
            pct = statistics.median(res["pct"])
            own = f"{pct:.2f} % ({pct / 100 * statistics.median(ts) * 1e6:.0f})"
        vs = "" if side == HAND else (f"{100 * (r - 1):+.2f} % ({100 * (lo - 1):+.2f}.."
                                      f"{100 * (hi - 1):+.2f})")
        us = "" if side == HAND else f"{(r - 1) * hand * 1e6:+.0f}"
        out.append(f"| {name} | {side} | {statistics.median(ts) * 1e3:.3f} | "
                   f"{min(ts) * 1e3:.3f}..{max(ts) * 1e3:.3f} | {vs} | {us} | {own} |")
    return out


def _verdict(name: str, res: dict[str, Any]) -> str:
    """The goal (within GOAL_PCT of the hand loop on a step of 1 ms or more) and whether
    overhead_pct agrees with the measured cost within FACTOR (both under GOAL_PCT counts
    as agreeing: below it the measurement is noise). Where the fit is faster than the hand
    loop (its batch-at-a-time loading), there is no cost to agree with: said as such."""
    hand = statistics.median(res["times"][HAND])
    fitted = statistics.median(res["times"][FIT])
    measured = 100 * (res["ratio"][FIT][0] - 1)
    floor = 100 * (res["ratio"][FIT][0] / res["ratio"][PREMADE][0] - 1)
    own = statistics.median(res["pct"]) * fitted / hand
    ok = measured <= GOAL_PCT or hand < 1e-3
    if max(measured, own) <= GOAL_PCT or (measured > 0 and 1 / FACTOR <= own / measured
                                          <= FACTOR):
        agree = "agrees"
    else:
        agree = "n/a (the fit is faster)" if measured < 0 else "DOES NOT agree"
    return (f"- {name}: {'PASS' if ok else 'FAIL'} (goal: within {GOAL_PCT} % of the hand "
            f"loop: {measured:+.2f} %; of the pre-made floor: {floor:+.2f} %; "
            f"{len(res['times'][HAND])} repeats); overhead_pct {agree} within a factor of "
            f"{FACTOR:g} ({own:.2f} % of the hand loop's step)")


if __name__ == "__main__":
    main()
