"""The speed-up redline tune gives, against where researchers start and an exhaustive grid.

For each built-in task, side by side in one run:

  start   batch 4, fp32, num_workers 0, no compile: where the issue found researchers begin
  tune    `redline tune` from the start (search.tune), its wall time included
  grid    every combination of the same factors, each cell timed the same way: micro-batch
          (powers of two from 1; a line of cells stops after three sizes in a row 25 %
          below its best), precision (every format the device runs but the emulation),
          channels_last (convolutional models), loader workers (0 .. cores - 1)

compile is left out of tune and the grid alike here: the grid would compile every cell
(30-45 s each on this CPU, a different graph per dtype and shape). tune's compile decision
is measured on its own (`--compile`), on sr3-tiny.

The start, tune's choice and the grid's three best cells are then timed again in
interleaved rounds (ROUNDS, each at least MIN_S): the table reports each one's median
samples/s and the rounds' range, tune's speed-up over the start, its gap to the grid's
best, and its wall time against the grid's. Last, for sst-tiny, the training time (its
evaluations excluded) to reach the evaluation RMSE the start config reaches in its run
(its best, plus 1 %), for the start and the tuned config: a larger batch changes the
optimisation, and this is the number that says whether the speed is worth having.

    PYTHONPATH=src python bench/speedup.py [--tasks sr3-tiny,...] [--budget-s 120]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.loading import worker_counts
from redline.quality import candidates
from redline.search import tune
from redline.task import resolve_task
from redline.trial import Runner, interleave

ROUNDS, MIN_S, CELL_S = 5, 0.5, 0.5
SLOW_STEP_S = 5.0  # a cell whose warm-up step takes longer ends its line (fp16 convs here)
TASKS = ("sr3-tiny", "reportgen-tiny", "sst-tiny")


def start_config(name: str) -> RunConfig:
    return RunConfig(task=name).updated({
        "train.batch_size": 4, "precision.name": "fp32", "data.num_workers": 0,
        "precision.compile": False})


def has_conv(task: Any) -> bool:
    return any(p.dim() == 4 for p in task.build_model().parameters())


def grid(task: Any, start: RunConfig, device: DeviceInfo) -> tuple[list[dict], float]:
    """Every cell of the grid, timed once (CELL_S): (cells, the grid's wall time)."""
    t0 = time.perf_counter()
    precisions = ["fp32", *candidates(device)[0]]
    layouts = [False, True] if has_conv(task) else [False]
    cells: list[dict] = []
    n = len(task.train_data())
    for precision, layout, workers in itertools.product(precisions, layouts,
                                                        worker_counts()):
        best, fallen, size = 0.0, 0, 1
        while size <= n and fallen < 3:
            cfg = start.updated({"precision.name": precision, "train.batch_size": size,
                                 "precision.channels_last": layout,
                                 "data.num_workers": workers})
            runner = Runner(task, cfg, device)
            try:
                if runner.warm_up() > SLOW_STEP_S:
                    cells.append({"config": cfg, "samples_per_s": None, "note": "too slow"})
                    break
                rate, _ = runner.time(CELL_S)
            finally:
                runner.close()
            cells.append({"config": cfg, "samples_per_s": rate})
            print(f"  grid {label(cfg)}: {rate:.1f} samples/s", file=sys.stderr, flush=True)
            fallen = fallen + 1 if rate < 0.75 * best else 0
            best = max(best, rate)
            size *= 2
    return cells, time.perf_counter() - t0


def label(cfg: RunConfig) -> str:
    parts = [cfg.precision.name, f"b{cfg.train.micro_batch}"]
    if cfg.precision.channels_last:
        parts.append("cl")
    if cfg.data.num_workers:
        parts.append(f"w{cfg.data.num_workers}")
    if cfg.precision.compile:
        parts.append("compile")
    return " ".join(parts)


def side_by_side(task: Any, configs: list[RunConfig], device: DeviceInfo) -> list[Any]:
    runners = [Runner(task, c, device) for c in configs]
    try:
        for r in runners:
            r.warm_up()
        return interleave(runners, ROUNDS, MIN_S)
    finally:
        for r in runners:
            r.close()


def bench_task(name: str, budget_s: float, device: DeviceInfo) -> dict[str, Any]:
    task = resolve_task(name, {})
    start = start_config(name)
    print(f"{name}: tune", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        tuned, report = tune(task, start, device, budget_s=budget_s, cache_dir=cache,
                             factors=("precision", "batch", "channels_last", "loader"),
                             say=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    tune_s = time.perf_counter() - t0
    print(f"{name}: grid", file=sys.stderr, flush=True)
    cells, grid_s = grid(task, start, device)
    timed = sorted((c for c in cells if c["samples_per_s"]), key=lambda c: -c["samples_per_s"])
    best = [c["config"] for c in timed[:3]]
    print(f"{name}: side by side", file=sys.stderr, flush=True)
    configs = [start, tuned, *best]
    timings = side_by_side(task, configs, device)
    rows = [{"setting": s, "config": label(c), "samples_per_s": t.samples_per_s,
             "range": (min(t.rates), max(t.rates))}
            for s, c, t in zip(["start", "tune", "grid 1", "grid 2", "grid 3"], configs,
                               timings, strict=False)]
    grid_best = max(t.samples_per_s for t in timings[2:])
    return {"task": name, "rows": rows, "tune_s": tune_s, "grid_s": grid_s,
            "grid_cells": len(cells),
            "speedup": timings[1].samples_per_s / timings[0].samples_per_s,
            "vs_grid": timings[1].samples_per_s / grid_best - 1,
            "reasons": report.reasons, "tuned": tuned.to_dict()}


def time_to_quality(device: DeviceInfo, tuned_yaml: dict[str, Any], steps: int) -> dict:
    """sst-tiny: training seconds (evaluation excluded) until the eval RMSE first reaches
    the best the start config reaches in `steps` (its best plus 1 %), for both configs."""
    from redline.trainer import Trainer

    records = {}
    for which, cfg in (("start", start_config("sst-tiny")),
                       ("tune", RunConfig.from_dict(tuned_yaml))):
        cfg = cfg.updated({"train.steps": steps, "train.eval_every": 20,
                           "telemetry.log_every": 20, "train.samples": 0})
        with tempfile.TemporaryDirectory() as d:
            Trainer(cfg, run_dir=Path(d) / "run", progress=False).fit()
            records[which] = [json.loads(line) for line in
                              (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    target = 1.01 * min(r["eval/rmse"] for r in records["start"] if "eval/rmse" in r)
    return {which: {**crossing(rs, target), "target": target} for which, rs in records.items()}


def crossing(records: list[dict[str, Any]], target: float) -> dict[str, Any]:
    busy, seen = 0.0, 0
    for r in records:
        if r.get("step_time_s") is not None:
            busy += r["step_time_s"] * (r["step"] - seen)
            seen = r["step"]
        if r.get("eval/rmse") is not None and r["eval/rmse"] <= target:
            return {"step": r["step"], "train_s": busy, "rmse": r["eval/rmse"]}
    return {"step": None, "train_s": busy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budget-s", type=float, default=120.0)
    p.add_argument("--quality-steps", type=int, default=1000,
                   help="sst-tiny's steps for the time-to-quality comparison; 0: skip it")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args()
    device = DeviceInfo.detect("cpu")
    results = [bench_task(n, args.budget_s, device) for n in args.tasks.split(",")]
    print("| task | setting | config | samples/s (median) | range | vs start |")
    print("|---|---|---|---|---|---|")
    for r in results:
        base = r["rows"][0]["samples_per_s"]
        for row in r["rows"]:
            lo, hi = row["range"]
            print(f"| {r['task']} | {row['setting']} | {row['config']} | "
                  f"{row['samples_per_s']:.1f} | {lo:.1f}-{hi:.1f} | "
                  f"{row['samples_per_s'] / base:.2f}x |")
    print("\n| task | tune speed-up | tune vs grid best | tune wall | grid wall (cells) | "
          "tune / grid time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['speedup']:.2f}x | {100 * r['vs_grid']:+.1f} % | "
              f"{r['tune_s']:.0f} s | {r['grid_s']:.0f} s ({r['grid_cells']}) | "
              f"{100 * r['tune_s'] / r['grid_s']:.0f} % |")
    quality = None
    sst = next((r for r in results if r["task"] == "sst-tiny"), None)
    if sst is not None and args.quality_steps:
        quality = time_to_quality(device, sst["tuned"], args.quality_steps)
        target = quality["start"]["target"]
        print(f"\n| sst-tiny, to eval RMSE <= {target:.4f} K | steps | training time |")
        print("|---|---|---|")
        for which, q in quality.items():
            when = f"{q['train_s']:.1f} s" if q["step"] else f"not within {q['train_s']:.0f} s"
            print(f"| {which} | {q['step'] or '-'} | {when} |")
    for r in results:
        print(f"\n{r['task']} tune's reasons:")
        for factor, why in r["reasons"].items():
            print(f"  {factor}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "quality": quality},
                                              default=str))


if __name__ == "__main__":
    main()
