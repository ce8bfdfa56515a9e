"""The speed-up redline tune gives, against where researchers start and an exhaustive grid.

For each built-in task, side by side in one run:

  start   batch 4, fp32, num_workers 0, no compile: where the issue found researchers begin
  tune    `redline tune` from the start (tuning.tune.tune), its wall time included
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
from redline.task import resolve_task
from redline.tuning.loader_choice import worker_counts
from redline.tuning.precision_screen import candidates
from redline.tuning.trial import Runner, interleave
from redline.tuning.tune import has_conv, tune

ROUNDS, MIN_S, CELL_S = 5, 0.5, 0.5
SLOW_STEP_S = 5.0  # a cell whose warm-up step takes longer ends its line (fp16 convs here)
TASKS = ("sr3-tiny", "reportgen-tiny", "sst-tiny")


GROW = {"train.grow_effective_batch": False}  # --grow-effective-batch sets it


def start_config(name: str) -> RunConfig:
    return RunConfig(task=name).updated({
        "train.batch_size": 4, "precision.name": "fp32", "data.num_workers": 0,
        "precision.compile": False, **GROW})


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


def from_label(start: RunConfig, text: str) -> RunConfig:
    """The config a `label` names (how a saved grid's best cells are read back)."""
    precision, batch, *rest = text.split()
    changes: dict[str, Any] = {"precision.name": precision,
                               "train.batch_size": int(batch[1:]),
                               "precision.channels_last": "cl" in rest}
    for part in rest:
        if part.startswith("w"):
            changes["data.num_workers"] = int(part[1:])
    return start.updated(changes)


def saved_grid(path: str, name: str) -> tuple[list[str], float, int] | None:
    """A grid an earlier run of this script measured: (its best cells' labels, its wall
    time, its cell count), or None."""
    saved = json.loads(Path(path).read_text())
    for r in saved["results"]:
        if r["task"] == name:
            best = r.get("grid_best") or [row["config"] for row in r["rows"][2:]]
            return best, r["grid_s"], r["grid_cells"]
    return None


def bench_task(name: str, budget_s: float, device: DeviceInfo,
               grid_json: str | None = None) -> dict[str, Any]:
    task = resolve_task(name, {})
    start = start_config(name)
    print(f"{name}: tune", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        tuned, report = tune(task, start, device, budget_s=budget_s, cache_dir=cache,
                             factors=("precision", "batch", "channels_last", "loader"),
                             say=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    tune_s = time.perf_counter() - t0
    reused = saved_grid(grid_json, name) if grid_json else None
    if reused is not None:  # the grid's choice from an earlier run; timed afresh below
        labels, grid_s, n_cells = reused
        best = [from_label(start, text) for text in labels]
    else:
        print(f"{name}: grid", file=sys.stderr, flush=True)
        cells, grid_s = grid(task, start, device)
        n_cells = len(cells)
        timed = sorted((c for c in cells if c["samples_per_s"]),
                       key=lambda c: -c["samples_per_s"])
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
            "grid_cells": n_cells, "grid_best": [label(c) for c in best],
            "grid_reused": reused is not None,
            "speedup": timings[1].samples_per_s / timings[0].samples_per_s,
            "vs_grid": timings[1].samples_per_s / grid_best - 1,
            "reasons": report.reasons, "tuned": tuned.to_dict()}


def time_to_quality(device: DeviceInfo, tuned_yaml: dict[str, Any], steps: int,
                    tuned_rate: float) -> dict:
    """sst-tiny: training seconds (evaluation excluded) until the eval RMSE first reaches
    the best the start config reaches in `steps` (its best plus 1 %), for both configs.
    The tuned config trains for at most twice the start's training time (at its measured
    samples/s), so a larger batch that learns less per sample shows as not reaching it."""
    from redline.run.trainer import Trainer

    records: dict[str, list[dict[str, Any]]] = {}
    tuned = RunConfig.from_dict(tuned_yaml)
    plans = [("start", start_config("sst-tiny"), steps), ("tune", tuned, None),
             ("tune, lr sqrt-scaled", tuned.updated({
                 "train.lr_scaling": "sqrt", "train.lr_reference_batch": 4,
                 "train.lr": tuned.train.lr * (tuned.train.samples_per_step / 4) ** 0.5}),
              None)]
    for which, cfg, n in plans:
        if n is None:  # twice the start's training time, at the tuned config's speed
            start_s = crossing(records["start"], -1.0)["train_s"]
            n = max(20, int(2 * start_s * tuned_rate / cfg.train.samples_per_step))
        cfg = cfg.updated({"train.steps": n, "train.eval_every": max(1, min(20, n // 25)),
                           "telemetry.log_every": max(1, min(20, n // 25)),
                           "train.samples": 0})
        with tempfile.TemporaryDirectory() as d:
            Trainer(cfg, run_dir=Path(d) / "run", progress=False).fit()
            records[which] = [json.loads(line) for line in
                              (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    target = 1.01 * min(r["eval/rmse"] for r in records["start"] if "eval/rmse" in r)
    return {which: {**crossing(rs, target), "target": target,
                    "steps_run": max(r.get("step", 0) for r in rs)}
            for which, rs in records.items()}


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
    p.add_argument("--grid-json", metavar="FILE",
                   help="take each task's grid (its three best cells, its wall time) from "
                        "an earlier run's --json instead of measuring it again; the cells "
                        "are still timed side by side with the start and tune afresh")
    p.add_argument("--grow-effective-batch", action="store_true",
                   help="let tune grow the effective batch past the start's 4 "
                        "(train.grow_effective_batch; the grid always does)")
    args = p.parse_args()
    GROW["train.grow_effective_batch"] = args.grow_effective_batch
    device = DeviceInfo.detect("cpu")
    results = [bench_task(n, args.budget_s, device, args.grid_json)
               for n in args.tasks.split(",")]
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
              f"{r['tune_s']:.0f} s | {r['grid_s']:.0f} s ({r['grid_cells']})"
              f"{' (earlier run)' if r['grid_reused'] else ''} | "
              f"{100 * r['tune_s'] / r['grid_s']:.0f} % |")
    quality = None
    sst = next((r for r in results if r["task"] == "sst-tiny"), None)
    if sst is not None and args.quality_steps:
        quality = time_to_quality(device, sst["tuned"], args.quality_steps,
                                  sst["rows"][1]["samples_per_s"])
        target = quality["start"]["target"]
        print(f"\n| sst-tiny, to eval RMSE <= {target:.4f} K | steps (of run) | training "
              "time | samples seen |")
        print("|---|---|---|---|")
        for name, q in quality.items():
            when = f"{q['train_s']:.1f} s" if q["step"] else f"not within {q['train_s']:.0f} s"
            batch = 4 if name == "start" else RunConfig.from_dict(
                sst["tuned"]).train.samples_per_step
            seen = q["step"] * batch if q["step"] else "-"
            print(f"| {name} | {q['step'] or '-'} ({q['steps_run']}) | {when} | {seen} |")
    for r in results:
        print(f"\n{r['task']} tune's reasons:")
        for factor, why in r["reasons"].items():
            print(f"  {factor}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "quality": quality},
                                              default=str))


if __name__ == "__main__":
    main()
