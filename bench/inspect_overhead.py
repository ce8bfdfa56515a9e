"""What per-layer statistics cost: redline's Inspector against none, and against pickling.

    PYTHONPATH=src python bench/inspect_overhead.py [--workloads conv-bn,mlp-large,mlp-small]
        [--repeats 9] [--every 200] [--threads 1]

Goal: statistics at the default cadence (inspect.every, 200) cost under 1 % of the run.
Variants, on the same model, optimizer and pre-made batches (bench/workloads.py), each a
block of `every` optimizer steps through Engine.step with the loop's events fired as the
trainer fires them (BATCH_START, a WINDOW every 50 steps):

  off        no statistics: the floor
  inspect    redline's Inspector at inspect.every (one inspection per block: parameters,
             gradients and activations of every layer, written as Parquet at the window)
  pickle     what people do by hand: every 100 steps, forward hooks keep every layer's
             output, and the weights, gradients and activations are pickled to a file

Blocks run in a random order in each repeat; a variant's cost is the median over repeats
of its block time over the floor's block time in the same repeat, with a distribution-free
95 % interval (paired, as bench/overhead.py does). One inspection in 200 steps is a small
effect next to the block-to-block noise of a shared machine, so the cost of one inspection
is also measured directly (blocks of 20 steps that each inspect, against blocks that do
not, interleaved) and divided by the cadence: the share of a run it costs.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairs import paired
from redline.engine import Engine
from redline.events import Dispatcher, Event, State
from redline.inspector import InspectConfig, Inspector
from workloads import CLIP, Workload, build

LOG_EVERY = 50
PICKLE_EVERY = 100


def _variant(w: Workload, tmp: Path, kind: str, every: int) -> Callable[[int], None]:
    """A function stepping `steps` optimizer steps of `w` the way `kind` watches them."""
    state = State(model=w.model, optimizer=w.optimizer, run_dir=str(tmp))
    callbacks = [Inspector(InspectConfig(every=every), tmp / kind)] if kind == "inspect" else []
    dispatcher = Dispatcher(callbacks)
    engine = Engine(w.model, w.optimizer, scheduler=w.scheduler, grad_clip=CLIP,
                    dispatcher=dispatcher, state=state)
    dispatcher.fire(Event.FIT_START, state)
    on_batch_start = dispatcher.table[Event.BATCH_START]

    def run(steps: int) -> None:
        for i in range(steps):
            batch = w.data[i % len(w.data)]
            for handler in on_batch_start:
                handler(state, batch)
            dump = kind == "pickle" and (state.step + 1) % PICKLE_EVERY == 0
            hooks, acts = (_keep_outputs(w.model) if dump else ([], {}))
            engine.step(batch, w.loss)
            state.step += 1
            if dump:
                for h in hooks:
                    h.remove()
                _pickle(w.model, acts, tmp / f"dump-{state.step}.pkl")
            if state.step % LOG_EVERY == 0:
                dispatcher.fire(Event.WINDOW, state, {"step": state.step})
    return run


def _keep_outputs(model: nn.Module) -> tuple[list[Any], dict[str, torch.Tensor]]:
    acts: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                acts[name] = output.detach().clone()
        return keep

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    return hooks, acts


def _pickle(model: nn.Module, acts: dict[str, torch.Tensor], path: Path) -> None:
    payload = {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
               "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None},
               "activations": acts}
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def per_inspection(w: Workload, repeats: int, tmp: Path, block: int = 20) -> tuple[float, float]:
    """(median ms one inspection adds to its step, the floor's ms per step): blocks of
    `block` steps that all inspect, interleaved with blocks that do not."""
    off, every_step = _variant(w, tmp, "off", 1), _variant(w, tmp / "each", "inspect", 1)
    off(block), every_step(block)  # warm-up
    extra, floor = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        off(block)
        a = (time.perf_counter() - t) / block
        t = time.perf_counter()
        every_step(block)
        extra.append((time.perf_counter() - t) / block - a)
        floor.append(a)
    return 1e3 * statistics.median(extra), 1e3 * statistics.median(floor)


def bench(w: Workload, repeats: int, every: int, tmp: Path) -> None:
    variants = {kind: _variant(w, tmp, kind, every) for kind in ("off", "inspect", "pickle")}
    for run in variants.values():  # warm-up: allocator, kernels, the first Parquet write
        run(every)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        for kind in order:
            t = time.perf_counter()
            variants[kind](every)
            times[kind].append(time.perf_counter() - t)
    step_ms = 1e3 * statistics.median(times["off"]) / every
    print(f"\n{w.name}: floor {step_ms:.2f} ms/step, {repeats} repeats of {every} steps")
    print(f"{'variant':<10} {'cost vs off':>12} {'95% interval':>20}")
    for kind in ("inspect", "pickle"):
        mid, lo, hi = paired(times, kind, floor="off")
        verdict = (" PASS" if mid - 1 < 0.01 else " over 1 %") if kind == "inspect" else ""
        print(f"{kind:<10} {100 * (mid - 1):>+11.2f}% {100 * (lo - 1):>+9.2f}% .."
              f" {100 * (hi - 1):>+6.2f}%{verdict}")
    cost, floor = per_inspection(w, repeats, tmp)
    share = 100 * cost / (every * floor)
    print(f"one inspection: {cost:.2f} ms ({cost / floor:.2f} steps of {floor:.2f} ms), "
          f"measured in blocks that inspect every step; at inspect.every={every}: "
          f"{share:.2f} % of the run{' PASS' if share < 1 else ' over 1 %'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="conv-bn,mlp-large,mlp-small")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--every", type=int, default=InspectConfig().every,
                   help="inspect.every (default: redline's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", default="128x160")
    p.add_argument("--large", default="512x176")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s); inspect.every={args.every}, pickle every {PICKLE_EVERY}")
    with tempfile.TemporaryDirectory(prefix="redline-inspect-") as tmp:
        for w in build(args.workloads.split(","), args.small, args.large):
            bench(w, args.repeats, args.every, Path(tmp))


if __name__ == "__main__":
    main()
