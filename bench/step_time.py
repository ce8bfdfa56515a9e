"""Seconds per optimizer step of a task under several precisions, side by side.

    python bench/step_time.py [--task sr3-tiny] [--precisions fp32,bf16-mixed,bf16-true]
                              [--batch-size 16] [--steps 5] [--repeats 3]

Each precision gets its own fresh model and optimizer (same seed, same batch); the
precisions are interleaved within each repeat, after two warm-up steps each. The table
gives the median seconds per step, the spread (min..max over repeats) and the ratio to
the first precision listed. This measures speed only; quality is a study's job.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import default_collate

from redline import batch as batch_tree
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.precision import get_precision
from redline.task import resolve_task


def make_step(task_name: str, precision: str, batch_size: int, device: DeviceInfo
              ) -> Callable[[], None]:
    task = resolve_task(task_name)
    torch.manual_seed(0)
    policy = get_precision(precision, device)
    model = policy.convert_module(task.build_model().to(device.torch_device))
    data = task.train_data()
    batch = batch_tree.move(default_collate([data[i] for i in range(batch_size)]),
                            device.torch_device)
    engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=1e-4), policy,
                    grad_clip=1.0)

    def step() -> None:
        with policy.global_context():
            engine.step(batch, task.loss).item()  # .item(): wait for the device

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sr3-tiny")
    p.add_argument("--precisions", default="fp32,bf16-mixed,bf16-true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = DeviceInfo.detect(args.device)
    names = args.precisions.split(",")
    steps = {n: make_step(args.task, n, args.batch_size, device) for n in names}
    for fn in steps.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"{args.task}, batch {args.batch_size}, {device.name} ({device.kind}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats x "
          f"{args.steps} steps, interleaved\n")
    print("| precision | median s/step | spread (min..max) | vs " + names[0] + " |")
    print("|---|---|---|---|")
    base = statistics.median(times[names[0]])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f}..{max(ts):.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
