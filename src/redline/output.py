"""What the CLI prints: result lines and tables, one function per command's output.

Results go to standard output (with --json, one JSON object as its last line); what the
user should know while a command works (a notice, a study's start and stop) goes to
standard error.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redline.study.matrix import Study
    from redline.tuning.autobatch import AutobatchResult
    from redline.tuning.tune import TuneReport
    from redline.tuning.workflow import Tuned


def print_json(obj: Any) -> None:
    """One JSON object on one line (values JSON cannot hold written as text)."""
    print(json.dumps(obj, default=str))


def show(as_json: bool, data: Any, text: str) -> None:
    """`data` as one JSON line (--json), else `text`."""
    if as_json:
        print_json(data)
    else:
        print(text)


def warn(message: str) -> None:
    print(message, file=sys.stderr)


def print_result(r: dict[str, Any]) -> None:
    loss = f"{r['final_loss']:.4g}" if r["final_loss"] is not None else "-"
    emulated = " (an emulation: its numerics, no speed-up)" if r.get("emulated") else ""
    print(f"trained {r['steps']} steps ({r['samples']} samples) in {r['precision']}{emulated} "
          f"on {r['device']}; final loss {loss}")
    if r.get("samples_per_s") is not None:
        mfu = f", MFU {100 * r['mfu']:.2f} %" if r.get("mfu") is not None else ""
        if mfu and r.get("hfu") is not None:
            mfu += f" (HFU {100 * r['hfu']:.2f} %, recomputation included)"
        cost = (f"; telemetry overhead {r['overhead_pct']:.3f} % of step time (measured)"
                if r.get("overhead_pct") is not None else "")
        print(f"speed: {r['samples_per_s']:.1f} samples/s{mfu}{cost}")
    if r["eval"]:
        print("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in r["eval"].items()))
    if r["interrupted"] and r["checkpoint"]:
        d = r["run_dir"]
        print(f"stopped by {r['interrupted']}; checkpoint saved: {r['checkpoint']}; continue "
              f"with redline train --config {d}/config.yaml --run-dir {d} --resume"
              + (f" --nproc {r['ranks']}" if r.get("ranks", 1) > 1 else ""))
    elif r["interrupted"]:
        print(f"stopped by {r['interrupted']} before the first step: nothing to resume")
    print(f"run directory: {r['run_dir']}")
    if r.get("report"):
        print(f"report: {r['report']} (open it in a browser; it needs no network)")


def print_trials(result: AutobatchResult) -> None:
    """The batch search's table: each size's memory, its speed and the rounds' spread (a
    size scanned once, not timed again in rounds, shows "scan" there)."""
    from redline.memory.probe import format_size

    print(f"{'micro-batch':>11}  {'peak memory':>12}  {'% of target':>11}  {'samples/s':>10}  "
          f"{'spread':>7}  chosen")
    timed = result.timed()
    rows = [(tr.size, tr) for tr in result.trials if tr.kind in ("probe", "verify")]
    rows += [(size, None) for size in set(timed) - {size for size, _ in rows}]
    rows.sort(key=lambda row: row[0])  # stable: a probe before its size's verification
    for size, tr in rows:
        peak, pct = "-", "-"  # a size only timed has no memory row of its own
        if tr is not None:
            peak = format_size(tr.peak_bytes) if tr.peak_bytes else "OOM"
            pct = f"{100 * tr.peak_bytes / result.target_bytes:.0f}%" if tr.peak_bytes else "-"
        speed = timed.pop(size, None)
        sps = f"{speed.samples_per_s:.1f}" if speed and speed.samples_per_s else "-"
        spread = (f"{100 * (speed.spread[1] - speed.spread[0]) / speed.samples_per_s:.1f}%"
                  if speed and speed.spread and speed.samples_per_s
                  else "scan" if speed else "-")
        mark = " ".join(m for m in ("<-" if size == result.chosen else "",
                                    "(start)" if size == result.start else "") if m)
        print(f"{size:>11}  {peak:>12}  {pct:>11}  {sps:>10}  {spread:>7}  {mark}".rstrip())


def print_batch_tune(result: AutobatchResult, target: float, ranks: int) -> None:
    """`redline tune --batch-only`'s table and its choice: the knee, the recipe it implies
    and the memory target it was sized for (`target`: memory.target)."""
    from redline.memory.probe import format_size

    print_trials(result)
    knee = f" ({result.why})" if result.why else ""
    print(f"largest fitting micro-batch {result.max_fit}, chosen {result.chosen}{knee}; "
          f"effective batch {result.effective_batch_size} = {result.chosen} x "
          f"{result.accumulation_steps}" + (f" x {ranks} ranks" if ranks > 1 else "")
          + f"; lr {result.lr:.3g}; eval batch {result.eval_batch_size}; target "
          f"{format_size(result.target_bytes)} ({target:.0%} of {result.budget_source})"
          + (" (cached)" if result.cache_hit else ""))


def print_tuned(tuned: Tuned, target: float) -> None:
    """`redline tune`'s result: the search's table and choices, then the written config
    (`target`: memory.target, which the batch search sized the micro-batch for)."""
    if tuned.report is not None:
        print_tune(tuned.report)
    elif tuned.batch is not None:
        print_batch_tune(tuned.batch, target, tuned.ranks)
    print(f"tuned config: {tuned.path}  (redline train --config {tuned.path})")
    if tuned.budget_dropped:
        print("memory.budget is left out of the tuned config (the micro-batch was sized "
              "for it); --keep-budget keeps it, at the cost of tracking every tensor "
              "operation on a CPU")


def print_tune(report: TuneReport) -> None:
    """redline tune's table (every setting tried), each factor's choice and reason, and
    the speed-up measured against the starting config."""
    from redline.memory.probe import format_size
    from redline.tuning.memory_plan import render_plan

    if report.memory_plan is not None:  # its own table: predicted and measured peaks
        print(render_plan(report.memory_plan) + "\n")
    print(f"{'factor':<14} {'setting':<42} {'samples/s':>10} {'spread':>7} {'peak memory':>12}"
          "  note")
    for row in report.rows:
        if row.factor == "memory" and report.memory_plan is not None:
            continue
        sps = f"{row.samples_per_s:.1f}" if row.samples_per_s else "-"
        spread = f"{100 * row.spread:.1f}%" if row.spread is not None else "-"
        peak = format_size(row.peak_bytes) if row.peak_bytes else "-"
        print(f"{row.factor:<14} {row.setting:<42} {sps:>10} {spread:>7} {peak:>12}  "
              f"{row.note}".rstrip())
    print("\nchosen:")
    for factor, reason in report.reasons.items():
        print(f"  {factor}: {reason}")
    if report.speedup is not None and report.speedup_range is not None:
        lo, hi = report.speedup_range
        print(f"speed-up: {report.speedup:.2f}x over the starting config (rounds "
              f"{lo:.2f}x..{hi:.2f}x; {report.start_samples_per_s:.1f} -> "
              f"{report.tuned_samples_per_s:.1f} samples/s, measured side by side)")
    over = report.wall_s - report.budget_s
    print(f"search: {report.wall_s:.0f} s (--budget-s {report.budget_s:.0f}"
          + (f"; {over:.0f} s over: a stage cannot stop mid-measurement" if over > 1 else "")
          + ")")


def print_study(summary: dict[str, Any]) -> None:
    metrics = list(next((e["metrics"] for e in summary["settings"] if e["reference"]), {}))
    print(f"{'setting':<28} {'samples/s':>10}  {'speed':<46}  " + "  ".join(metrics))
    for e in summary["settings"]:
        speed = f"{e['samples_per_s']:.1f}" if e.get("samples_per_s") else "-"
        verdict = (e.get("speed") or {}).get("text", "-")
        if e["status"] in ("refused", "incomplete"):
            cells = [f"{e['status']}: {e.get('reason') or ''}"]
        else:
            cells = [f"{m}: {e['metrics'][m]['mean']:.4g} ({e['metrics'][m]['text']})"
                     if e["metrics"].get(m, {}).get("mean") is not None
                     else f"{m}: {e['metrics'].get(m, {}).get('text', '-')}" for m in metrics]
        label = e["setting"] + (" (emulated)" if e.get("emulated") else "")
        print(f"{label:<28} {speed:>10}  {verdict:<46}  " + "; ".join(cells))
        if e.get("changed_nothing"):
            print(f"{'':<28} flagged: {e['changed_nothing']}")
    timing = summary.get("timing") or {}
    if timing.get("skipped"):
        print(f"speed: {timing['skipped']}")
    rec = summary.get("recommendation")
    if rec and rec.get("change", True):
        print(f"recommendation: {rec['setting']} — {rec['why']}")
        if rec.get("excluded"):
            print("not recommended: " + "; ".join(f"{k}: {v}"
                                                  for k, v in rec["excluded"].items()))
    elif rec:
        print(f"recommendation: none, keep {rec['setting']} — {rec['why']}")
    else:
        print("recommendation: none (no setting finished within the reference's noise)")
    print(f"report: {summary['report']}")


def print_study_start(study: Study) -> None:
    labels = ", ".join(dict.fromkeys(s.label for s in study.settings))
    print(f"study {study.dir}: {len(study.settings)} runs of {study.base.train.steps} steps "
          f"({labels})", file=sys.stderr, flush=True)
    for note in study.notes:
        print(f"study: {note}", file=sys.stderr, flush=True)


def print_study_stopped(study: Study, stopped: str, task: str | None,
                        precisions: list[str]) -> None:
    """How to continue a study a signal stopped (`task` as the user named it)."""
    print(f"study stopped by {stopped}; continue with redline study {task or ''} "
          f"--precision {','.join(precisions)} --run-dir {study.dir} --resume "
          "(and the same flags)", file=sys.stderr)
