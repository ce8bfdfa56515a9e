"""Automatic batch-size finding under one CPU memory budget: redline, Lightning, Accelerate.

    python bench/autobatch.py [--repeats 3] [--budget 256MiB] [--start 4096] [--threads 2]

About 1.5 minutes on 2 idle cores with the defaults.

One workload (BenchTask below: a small BatchNorm convnet on seeded random 3x32x32 images,
4096 samples, AdamW) and one budget for all three tools:

  redline     `autobatch(task, config, cpu)` with memory.budget=BUDGET, memory.target=TARGET
              (0.95 by default: the same 5 % headroom Lightning's binsearch leaves; a row
              at redline's default 0.85 is reported too) and a fresh cache_dir (a cold
              search); the size found is `max_fit`. Its
              search includes timing steps for the throughput knee (`chosen`, printed
              below the table); a second row runs it with measure_throughput=False, the
              memory search alone, which is what the peers do.
  Lightning   `Tuner(trainer).scale_batch_size(mode="binsearch", init_val=2, max_trials=25,
              steps_per_trial=3)` on a LightningModule with a `batch_size` attribute.
  Accelerate  `find_executable_batch_size(starting_batch_size=START)` around a function
              that runs 3 training steps at the size it is given (its default reduction
              on OOM: x0.9 per failure).

The peers search inside `redline.memory.probe.MemoryBudget(BUDGET, cpu,
baseline=live_tensor_bytes(model, optimizer))`: every tensor byte allocated inside
(activations, gradients, optimizer state, collated batches) counts, and passing the
budget raises a genuine torch.OutOfMemoryError worded like the CPU allocator's
("DefaultCPUAllocator: can't allocate memory"), which both peers' OOM detectors accept.
redline enforces the same budget itself, with the same accounting.

Each tool's search runs --repeats times, interleaved (the order rotates every repeat);
the table gives the median wall time of a search and its spread (min..max), the sizes
tried and training steps run (failed ones included), the size found, and, measured the
same way for every tool afterwards: the peak memory of one training step at that size
(redline's MemoryTracker, baseline model + optimizer state + batch) as a share of the
budget, and samples/s at that size (median step time over --timing-rounds interleaved
rounds of --timing-steps steps, outside any tracker). Run it on an idle machine: another
process busy on one of the cores makes 2-thread step times swing several-fold (OpenMP
threads waiting on each other); --threads 1 is steadier there.

Goal being tested: redline finds at least as large a size as the best peer in at most a
third of that peer's wall time. The verdict is printed as measured, pass or fail.
Note that the tools aim at different fills: redline at memory.target of the budget,
Lightning's binsearch at the largest size that ran minus its 5 % margin, Accelerate at
the first size of START * 0.9^k that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from redline.device import DeviceInfo
from redline.memory.probe import MemoryBudget, measure_peak
from redline.memory.sizes import format_size, live_tensor_bytes, parse_size

TASK_SPEC = f"{Path(__file__).resolve()}:BenchTask"
STEPS_PER_TRIAL = 3


class BenchTask:
    """The shared workload: a task file redline can load by path (see TASK_SPEC).

    About 0.5 MiB of activations per sample and ~0.5 ms per sample per step on 2 cores,
    so a 256MiB budget admits a few hundred samples and a step takes a fraction of a second.
    """

    name = "autobatch-bench"

    def __init__(self, n: int = 4096, width: int = 16, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.width, self.classes = width, classes

    def build_model(self) -> nn.Module:
        c1, c2 = self.width, 2 * self.width
        return nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, self.classes),
        )

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> None:
        return None

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # The optimizer redline tunes with (redline.job.build.build_optimizer): AdamW, foreach.
    return torch.optim.AdamW(model.parameters(), lr=2e-4, foreach=True)


@dataclass
class Search:
    """One search by one tool."""

    size: int | None = None
    wall_s: float = 0.0
    sizes: list[int] = field(default_factory=list)  # sizes tried, in order
    steps: int = 0  # training steps started, failed ones included
    ooms: int = 0
    note: str = ""
    chosen: int | None = None  # redline: the throughput knee it would train with
    error: str | None = None


@contextlib.contextmanager
def _in_tempdir() -> Iterator[str]:
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="redline-autobatch-") as tmp:
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(old)


def _budget(budget: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryBudget:
    return MemoryBudget(budget, DeviceInfo.detect("cpu"),
                        baseline=live_tensor_bytes(model, optimizer))


# ---- the three tools -------------------------------------------------------------------


def search_redline(budget: int, target: float, measure_throughput: bool = True) -> Search:
    out = Search()
    t0 = time.perf_counter()
    try:
        from redline.config import load_config
        from redline.task import resolve_task
        from redline.tuning.autobatch import autobatch

        config = load_config(None, [f"task={TASK_SPEC}", f"memory.budget={budget}",
                                    f"memory.target={target}", "device=cpu"])
        assert config.task is not None
        task = resolve_task(config.task, config.task_args)
        with tempfile.TemporaryDirectory(prefix="redline-autobatch-cache-") as cache:
            result = autobatch(task, config, DeviceInfo.detect("cpu"), cache_dir=cache,
                               measure_throughput=measure_throughput)
    except Exception as e:  # report what failed, keep the other columns
        out.wall_s = time.perf_counter() - t0
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.wall_s = time.perf_counter() - t0
    out.size = result.max_fit
    memory_trials = [t for t in result.trials if t.kind in ("probe", "verify")]
    out.sizes = [t.size for t in memory_trials]
    out.ooms = sum(not t.fits for t in memory_trials)
    out.steps = result.probe_steps + result.verify_steps + result.throughput_steps
    out.chosen = result.chosen if measure_throughput else None
    out.note = (f"steps: {result.probe_steps} probe + {result.verify_steps} verify + "
                f"{result.throughput_steps} throughput timing")
    return out


def search_lightning(budget: int, task: BenchTask) -> Search:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    out = Search()
    completed: dict[int, int] = {}  # size -> optimizer steps that finished

    class LitBench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = task.build_model()
            self.batch_size = 2
            self.opt = _optimizer(self.net)  # made here so the budget's baseline can see it

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out.steps += 1
            if not out.sizes or out.sizes[-1] != len(batch[1]):
                out.sizes.append(len(batch[1]))
            return task.loss(self.net, batch)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            completed[len(batch[1])] = completed.get(len(batch[1]), 0) + 1

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.opt

        def train_dataloader(self) -> DataLoader:
            return DataLoader(task.train_data(), batch_size=self.batch_size, shuffle=True)

    t0 = time.perf_counter()
    with _in_tempdir() as tmp:
        model = LitBench()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp)
        try:
            with _budget(budget, model, model.opt):
                out.size = Tuner(trainer).scale_batch_size(
                    model, mode="binsearch", init_val=2, max_trials=25,
                    steps_per_trial=STEPS_PER_TRIAL)
        except Exception as e:
            out.error = f"{type(e).__name__}: {str(e)[:200]}"
    out.wall_s = time.perf_counter() - t0
    # A size that did not complete all its trial steps hit the budget.
    out.ooms = sum(completed.get(s, 0) < STEPS_PER_TRIAL for s in out.sizes)
    out.note = "returned size includes Lightning's 5 % binsearch margin"
    return out


def search_accelerate(budget: int, task: BenchTask, start: int) -> Search:
    from accelerate.utils import find_executable_batch_size

    out = Search()
    t0 = time.perf_counter()
    model = task.build_model()
    optimizer = _optimizer(model)
    data = task.train_data()
    completed: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size: int) -> int:
        out.sizes.append(batch_size)
        loader = DataLoader(data, batch_size=batch_size, shuffle=True)
        for i, batch in enumerate(loader):
            if i == STEPS_PER_TRIAL:
                break
            out.steps += 1
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            optimizer.step()
        completed.append(batch_size)
        return batch_size

    try:
        with _budget(budget, model, optimizer):
            out.size = train()
    except Exception as e:
        out.error = f"{type(e).__name__}: {str(e)[:200]}"
    out.wall_s = time.perf_counter() - t0
    out.ooms = len(out.sizes) - len(completed)
    out.note = f"start {start}, x0.9 per OOM"
    return out


# ---- the common measurement at the size found ------------------------------------------


def measure_sizes(task: BenchTask, sizes: list[int], steps: int, rounds: int
                  ) -> dict[int, tuple[int, float]]:
    """size -> (peak bytes of one step, median samples/s), the same way for every tool.

    Peak: one step under redline's MemoryTracker, baseline model + optimizer state + batch
    (so the batch counts, as it did inside the searches). Speed: `rounds` interleaved
    rounds of `steps` timed steps per size, outside any tracker; median step time.
    """
    steppers: dict[int, Callable[[], None]] = {}
    peaks: dict[int, int] = {}
    for size in sizes:
        torch.manual_seed(0)
        model = task.build_model()
        optimizer = _optimizer(model)
        data = task.train_data()
        batch = default_collate([data[i % len(data)] for i in range(size)])

        def step(m: nn.Module = model, o: torch.optim.Optimizer = optimizer,
                 b: Any = batch) -> None:
            o.zero_grad(set_to_none=True)
            task.loss(m, b).backward()
            o.step()

        step()  # warm-up: optimizer state, oneDNN kernels for this shape
        optimizer.zero_grad(set_to_none=True)
        peaks[size] = measure_peak(step, DeviceInfo.detect("cpu"), baseline=live_tensor_bytes(
            model, optimizer, batch)).peak_bytes
        steppers[size] = step
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(rounds):
        for size, step in steppers.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times[size].append(time.perf_counter() - t0)
    return {s: (peaks[s], s / statistics.median(times[s])) for s in sizes}


# ---- main ------------------------------------------------------------------------------


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning)(\..*)?")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def _sizes(sizes: list[int], limit: int = 12) -> str:
    text = ",".join(map(str, sizes[:limit]))
    return text + (f",... ({len(sizes)} in all)" if len(sizes) > limit else "")


def _spread(values: list[Any]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", default="256MiB", help="CPU memory budget, e.g. 256MiB")
    p.add_argument("--target", type=float, default=0.95,
                   help="redline memory.target for the goal's row (0.95: Lightning's 5 %% "
                        "margin; redline's own default is 0.85, also reported)")
    p.add_argument("--start", type=int, default=4096,
                   help="Accelerate's starting_batch_size (default: the dataset size)")
    p.add_argument("--timing-steps", type=int, default=5,
                   help="timed steps per size per round for samples/s")
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()

    import accelerate
    import lightning

    _quiet()
    torch.set_num_threads(args.threads)
    budget = parse_size(args.budget)
    assert budget is not None
    cpu = DeviceInfo.detect("cpu")
    print(f"{cpu.name}; torch {torch.__version__}, {args.threads} thread(s); "
          f"lightning {lightning.__version__}, accelerate {accelerate.__version__}; "
          f"budget {format_size(budget)}; {args.repeats} repeats, interleaved\n")

    bench_start = time.perf_counter()
    task = BenchTask()
    tools: dict[str, Callable[[], Search]] = {
        f"redline autobatch, target {args.target}": lambda: search_redline(budget, args.target),
        f"redline autobatch, target {args.target}, measure_throughput=False": lambda:
            search_redline(budget, args.target, measure_throughput=False),
        "redline autobatch, default target 0.85": lambda: search_redline(budget, 0.85),
        "Lightning scale_batch_size (binsearch)": lambda: search_lightning(budget, task),
        "Accelerate find_executable_batch_size": lambda: search_accelerate(
            budget, task, args.start),
    }
    names = list(tools)
    runs: dict[str, list[Search]] = {k: [] for k in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(tools[name]())

    found: dict[str, int | None] = {}
    for name in names:
        sizes = [s.size for s in runs[name] if s.size is not None and s.error is None]
        found[name] = statistics.median_low(sizes) if sizes else None
    chosen = {s.chosen for ss in runs.values() for s in ss if s.chosen and not s.error}
    wanted = sorted({v for v in found.values() if v is not None} | chosen)
    measured = measure_sizes(task, wanted, args.timing_steps, args.timing_rounds)

    print("| tool | sizes tried / steps run | OOMs | median wall s | spread (min..max) "
          "| size found | peak at size (% of budget) | samples/s at size |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, tuple[int | None, float]] = {}
    for name in names:
        ss = runs[name]
        walls = [s.wall_s for s in ss]
        med = statistics.median(walls)
        summary[name] = (found[name], med)
        size = found[name]
        if size is None:
            print(f"| {name} | - | - | {med:.2f} | {min(walls):.2f}..{max(walls):.2f} "
                  f"| FAILED | - | - |")
            continue
        ok = [s for s in ss if s.size is not None and s.error is None]
        peak, speed = measured[size]
        print(f"| {name} | {_spread([len(s.sizes) for s in ok])} / "
              f"{_spread([s.steps for s in ok])} | {_spread([s.ooms for s in ok])} "
              f"| {med:.2f} | {min(walls):.2f}..{max(walls):.2f} "
              f"| {_spread([s.size for s in ok])} "
              f"| {format_size(peak)} ({100 * peak / budget:.1f} %) | {speed:.0f} |")

    print("\nSearch paths (last repeat) and notes:")
    for name in names:
        last = runs[name][-1]
        print(f"- {name}: sizes {_sizes(last.sizes)}; {last.note}")
        knees = [s.chosen for s in runs[name] if s.chosen is not None and not s.error]
        if knees:
            print("  chosen (throughput knee), per repeat: " + ", ".join(
                f"{k} ({measured[k][1]:.0f} samples/s)" for k in knees))
        for s in runs[name]:
            if s.error:
                print(f"  ERROR: {s.error}")

    red_size, red_wall = summary[names[0]]
    peer_names = [n for n in names if not n.startswith("redline")]
    peers = [(summary[n][0], -summary[n][1], n) for n in peer_names if summary[n][0]]
    print()
    if red_size is None or not peers:
        print("Goal: not decidable (a search failed, see above).")
    else:
        best_size, neg_wall, best = max(peers)  # largest size; among ties, the fastest
        size_ok = red_size >= best_size
        time_ok = red_wall <= -neg_wall / 3
        print(f"Goal: redline size >= best peer's ({best}): {red_size} vs {best_size} -> "
              f"{'PASS' if size_ok else 'FAIL'}; redline wall <= 1/3 of that peer's: "
              f"{red_wall:.2f} s vs {-neg_wall:.2f} s ({red_wall / -neg_wall:.2f}x) -> "
              f"{'PASS' if time_ok else 'FAIL'}; overall "
              f"{'PASS' if size_ok and time_ok else 'FAIL'}")
        for r in (n for n in names if n.startswith("redline")):
            for n in peer_names:
                print(f"  {r} wall / {n} wall: {summary[r][1] / summary[n][1]:.2f}x")
    print(f"\nwhole bench: {time.perf_counter() - bench_start:.1f} s")


if __name__ == "__main__":
    main()
