"""bench/levers.py's tables: the plan against the grid, predicted against measured peaks,
accelerate's estimate beside them, and what each lever costs (markdown, as printed)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redline.memory.levers import Levers
from redline.memory.sizes import format_size

TARGET = 0.85  # memory.target of every budget (bench/levers.py)


@dataclass
class Cell:
    levers: Levers
    micro: int
    peak: int = 0
    cost_s: float = 0.0  # seconds to build the job and measure its steady-state peak
    predicted: int | None = None


@dataclass
class Result:
    model: Any  # levers.py's Model
    combos: list[Levers]  # the grid's lever combinations
    parameters: int  # the model's parameter count
    offered: tuple[str, ...]  # the optimizer states the plan may choose (job/memory.py)
    cells: dict[tuple[Levers, int], Cell] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    rates: dict[tuple[Levers, int], list[float]] = field(default_factory=dict)
    timing_s: dict[tuple[Levers, int], float] = field(default_factory=dict)
    breakdown: Any = None
    accelerate: int | None = None


def label(levers: Levers, micro: int) -> str:
    ck = levers.checkpointing if levers.checkpointed_blocks is None else \
        f"{levers.checkpointing}[{levers.checkpointed_blocks}]"
    return f"{ck}/{levers.optimizer_state} b{micro}"


def rate(result: Result, key: tuple[Levers, int]) -> tuple[float, float, float]:
    """(median samples/s, lowest, highest) of a cell's rounds."""
    r = result.rates[key]
    return statistics.median(r), min(r), max(r)


def _rate_text(result: Result, key: tuple[Levers, int]) -> str:
    med, lo, hi = rate(result, key)
    return f"{med:.1f} ({lo:.1f}-{hi:.1f})"


def main_table(results: list[Result]) -> list[str]:
    out = ["| model | budget | fitting combos | grid's best (levers, micro-batch) | samples/s "
           "(range) | plan's choice | samples/s (range) | plan vs grid | plan vs grid, the "
           "plan's states | plan wall | grid wall | plan / grid time |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errors: list[str] = []
    speed: list[bool] = []  # per budget where both ran: the plan within 5 % of the best
    fair: list[bool] = []  # ... of the best among the states the plan offers
    quick: list[bool] = []  # ... in under 15 % of the grid's wall time
    for res in results:
        for b in res.budgets:
            fitting = [(lv, m) for lv, m in b["found"].items() if m is not None]
            grid_s = b["measure_s"] + sum(res.timing_s[k] for k in fitting)
            head = f"| {res.model.key} | {b['name']} = {format_size(b['budget'])} | " \
                   f"{len(fitting)} of {len(res.combos)} | "
            if not fitting:
                best_text, best = "nothing fits", None
            else:
                best = max(fitting, key=lambda k: rate(res, k)[0])
                best_text = f"{label(*best)} | {_rate_text(res, best)}"
            plan = b["plan"]
            if "error" in plan:
                errors.append(f"{res.model.key} {b['name']}: plan: {plan['error']}")
                plan_text = f"no plan ({len(errors)}) | - | - | - | - "
            else:
                key = plan["key"]
                vs = (f"{100 * (rate(res, key)[0] / rate(res, best)[0] - 1):+.1f} %"
                      if best else "-")
                ours = [k for k in fitting if k[0].optimizer_state in res.offered]
                mine = max(ours, key=lambda k: rate(res, k)[0]) if ours else None
                vs2 = (f"{100 * (rate(res, key)[0] / rate(res, mine)[0] - 1):+.1f} %"
                       if mine else "-")
                over = plan.get("peak", 0) > TARGET * b["budget"]
                if over:
                    errors.append(f"{res.model.key} {b['name']}: the plan's choice peaks at "
                                  f"{format_size(plan['peak'])}, over memory.target "
                                  f"({format_size(int(TARGET * b['budget']))}), which the "
                                  "grid's cells must fit")
                flag = f" (over target, {len(errors)})" if over else ""
                plan_text = (f"{label(*key)}{flag} | {_rate_text(res, key)} | {vs} | {vs2} | "
                             f"{plan['wall_s']:.0f} s")
                if best:
                    speed.append(rate(res, key)[0] >= 0.95 * rate(res, best)[0])
                if mine:
                    fair.append(rate(res, key)[0] >= 0.95 * rate(res, mine)[0])
            share = (f"{100 * plan['wall_s'] / grid_s:.0f} %" if "wall_s" in plan else "-")
            if "wall_s" in plan:
                quick.append(plan["wall_s"] < 0.15 * grid_s)
            if best is None:
                best_text += " | -"
            out.append(f"{head}{best_text} | {plan_text} | {grid_s:.0f} s | {share} |")
    out += [""] + [f"({i}) {e}" for i, e in enumerate(errors, 1)] if errors else []
    out.append(f"\ngoal, the plan within 5 % of the grid's best samples/s: {sum(speed)} of "
               f"{len(speed)} budgets where both ran ({sum(fair)} of {len(fair)} against "
               f"the grid's best of the states the plan offers, "
               f"{', '.join(results[0].offered) if results else ''}); in under 15 % of the "
               f"grid's wall time: {sum(quick)} of {len(quick)}")
    return out


def prediction_table(res: Result) -> list[str]:
    sizes = sorted({m for _, m in res.cells}, reverse=True)
    out = [f"| {res.model.key} levers | " + " | ".join(f"micro-batch {m}" for m in sizes)
           + " |", "|---|" + "---|" * len(sizes)]
    for levers in res.combos:
        row = []
        for m in sizes:
            cell = res.cells.get((levers, m))
            if cell is None:
                row.append("")
            elif cell.predicted is None:
                row.append(format_size(cell.peak))
            else:
                err = 100 * (cell.predicted / cell.peak - 1)
                row.append(f"{format_size(cell.peak)} / {format_size(cell.predicted)} "
                           f"({err:+.0f} %)")
        out.append(f"| {label(levers, 0)[:-3]} | " + " | ".join(row) + " |")
    errors = [abs(c.predicted / c.peak - 1) for c in res.cells.values()
              if c.predicted is not None]
    if errors:
        out.append(f"\n{res.model.key}: prediction error over {len(errors)} cells: median "
                   f"{100 * statistics.median(errors):.1f} %, largest "
                   f"{100 * max(errors):.1f} %; within 10 %: "
                   f"{sum(e <= 0.10 for e in errors)} of {len(errors)}")
    return out


def accelerate_table(results: list[Result]) -> list[str]:
    out = ["| model | parameters | accelerate estimate-memory (fp32, Adam) | measured peak, "
           "micro-batch 1 | measured peak, micro-batch E | breakdown's prediction at E |",
           "|---|---|---|---|---|---|"]
    for res in results:
        e = res.model.effective
        none1, noneE = res.cells[(Levers(), 1)], res.cells[(Levers(), e)]
        n = res.parameters
        acc = format_size(res.accelerate) if res.accelerate else "not installed"
        pred = format_size(noneE.predicted) if noneE.predicted else "-"
        out.append(f"| {res.model.key} | {n / 1e6:.2f} M | {acc} | "
                   f"{format_size(none1.peak)} | {format_size(noneE.peak)} (E={e}) | {pred} |")
    return out


def cost_table(results: list[Result]) -> list[str]:
    out = ["| model | levers (micro-batch E) | samples/s vs no lever | steady-state peak | "
           "memory freed |", "|---|---|---|---|---|"]
    for res in results:
        e = res.model.effective
        base_rate = rate(res, (Levers(), e))[0]
        base_peak = res.cells[(Levers(), e)].peak
        for levers in res.combos:
            key = (levers, e)
            peak = res.cells[key].peak
            out.append(f"| {res.model.key} | {levers.describe()} | "
                       f"{rate(res, key)[0] / base_rate:.2f}x | {format_size(peak)} | "
                       f"{format_size(base_peak - peak)} "
                       f"({100 * (1 - peak / base_peak):.0f} %) |")
    return out


def print_tables(results: list[Result]) -> None:
    print()
    print("\n".join(main_table(results)))
    for res in results:
        print()
        print("\n".join(prediction_table(res)))
    print()
    print("\n".join(accelerate_table(results)))
    print()
    print("\n".join(cost_table(results)))
    for res in results:
        for b in res.budgets:
            if "summary" in b["plan"]:
                print(f"\n{res.model.key} {b['name']}: plan: {b['plan']['summary']}")


def write_json(path: str, results: list[Result]) -> None:
    Path(path).write_text(json.dumps([{
        "model": r.model.key, "args": r.model.args, "effective": r.model.effective,
        "cells": [{"checkpointing": c.levers.checkpointing,
                   "blocks": c.levers.checkpointed_blocks,
                   "state": c.levers.optimizer_state, "micro": c.micro,
                   "peak": c.peak, "predicted": c.predicted, "cost_s": c.cost_s}
                  for c in r.cells.values()],
        "rates": {label(*k): v for k, v in r.rates.items()},
        "timing_s": {label(*k): v for k, v in r.timing_s.items()},
        "budgets": [{**{k: v for k, v in b.items() if k not in ("found", "measured")},
                     "found": {label(lv, m or 0): m for lv, m in b["found"].items()}}
                    for b in r.budgets],
        "accelerate": r.accelerate} for r in results], default=str, indent=1))
