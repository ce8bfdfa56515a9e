"""What a run directory measured, and a study's settings judged against the reference.

`run_figures(RUN_DIR)` reads metrics.jsonl: the median samples/s and step time over the
run's windows (the first left out when there are others: it holds start-up), the peak
memory (the allocator's or the budget tracker's peak where there is one; on a CPU without a
budget, the peak its tracked first step counted; else the process's resident high-water
mark; and which it is), the final evaluation, and the
skipped and non-finite steps, the precision that ran and, for fp8, how many layers it
converted, and the run's trace (every window's loss and every evaluation, to tell a
setting bit-identical to the reference's). `summarize(plan, outcomes, study_dir)` groups a
study's runs by setting, gives the reference's band for each metric and every other
setting's verdict (judge.py), the speed-up against the reference from the interleaved
timing rounds (timing.py; a run's own samples/s is kept beside it, not judged), and the
flags and recommendation of verdicts.py: the fastest setting faster beyond the timing
noise whose every metric is within the reference's noise or better, and that changed
something; otherwise none (keep the reference) with each setting's reason. An emulated
precision (fp8-emulated) is judged on quality but never recommended for speed: its
samples/s are not the format's.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redline import judge
from redline.study import verdicts
from redline.study.timing import read_timing
from redline.telemetry import schema as K
from redline.telemetry.jsonl import read_jsonl

PLAN = "study.json"  # a study directory's plan: task, base config, settings
OUTCOMES = "outcomes"  # its folder of one outcome file per finished, refused or diverged run


def read_outcomes(study_dir: str | Path) -> dict[str, dict[str, Any]]:
    """run name -> its outcome record, for every run the study has finished or recorded."""
    return {p.stem: json.loads(p.read_text())
            for p in sorted((Path(study_dir) / OUTCOMES).glob("*.json"))}


def run_figures(run_dir: str | Path) -> dict[str, Any]:
    """The figures of one run directory (module docstring); {} if it has no metrics."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = read_jsonl(path)
    windows = [r for r in rows if r.get(K.LOSS) is not None or r.get(K.SAMPLES_PER_S)]
    timed = windows[1:] if len(windows) > 1 else windows
    evals = [r for r in rows if any(K.is_eval(k) for k in r)]

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    peak, source = None, None
    checked = _checked_peak(Path(run_dir) / "events.jsonl")
    for key, name in ((K.MEM_PEAK, "tensor peak"), ("", "tensor peak, first step tracked"),
                      (K.MEM_RSS_PEAK, "process resident peak")):
        if not key and checked:
            peak, source = checked, name
            break
        values = [r[key] for r in windows if isinstance(r.get(key), (int, float))]
        if values:
            peak, source = max(values), name
            break
    precision, fp8_layers = _precision_record(Path(run_dir) / "events.jsonl")
    final_eval = {k.removeprefix(K.EVAL_PREFIX): _number(v)
                  for k, v in (evals[-1] if evals else {}).items()
                  if K.is_eval(k) and k != K.EVAL_TIME and _number(v) is not None}
    return {
        "samples_per_s": median(K.SAMPLES_PER_S), "step_time_s": median(K.STEP_TIME),
        "peak_memory_bytes": peak, "peak_memory_source": source, "eval": final_eval,
        "final_loss": _number(windows[-1].get(K.LOSS)) if windows else None,
        "skipped_steps": sum(int(r.get(K.SKIPPED_STEPS) or 0) for r in windows),
        "nonfinite_steps": sum(int(r.get(K.NONFINITE_STEPS) or 0) for r in windows),
        "emulated": any(r.get(K.EMULATED) for r in windows),
        "precision": precision,
        "fp8_layers": len(fp8_layers) if precision in verdicts.FP8_NAMES else None,
        "fp8_converted": (sum(bool(d.get("converted")) for d in fp8_layers)
                          if precision in verdicts.FP8_NAMES else None),
        "trace": [[r.get(K.STEP), r.get(K.LOSS)] for r in windows]
                 + [sorted((k, str(v)) for k, v in r.items() if K.is_eval(k)
                           and k != K.EVAL_TIME) for r in evals],
    }


def _precision_record(events: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """(the precision the run started with, fp8's per-layer decisions: [] when it
    recorded none, as a model with no Linear or convolution does), from events.jsonl."""
    if not events.is_file():
        return None, []
    rows = read_jsonl(events)
    precision = next((e.get("precision") for e in reversed(rows)
                      if e.get("event") == "run_start"), None)
    plan = [e for e in rows if e.get("event") == "fp8_layers"]
    return precision, (plan[-1].get("layers") or []) if plan else []


def _checked_peak(events: Path) -> int | None:
    """The largest peak a CPU run's tracked first steps counted (events.jsonl)."""
    if not events.is_file():
        return None
    peaks = [int(v) for e in read_jsonl(events) if e.get("event") == "memory_checked"
             for v in e.get("peaks", {}).values()]
    return max(peaks) if peaks else None


def _number(value: Any) -> float | None:
    """A metric as a float: metrics.jsonl writes NaN and infinities as strings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    return None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def summarize(plan: Mapping[str, Any], outcomes: Mapping[str, Mapping[str, Any]],
              study_dir: str | Path, directions: Mapping[str, str] | None = None,
              timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The study's summary: one entry per setting, and the recommendation (module doc).
    `timing`: the interleaved rounds (timing.py's record); default STUDY/timing.json."""
    groups: dict[str, dict[str, Any]] = {}
    for s in plan["settings"]:
        label, run = s["label"], s["run"]
        group = groups.setdefault(label, {"setting": label, "precision": s["precision"],
                                          "vary": dict(s["vary"]), "reference": s["reference"],
                                          "runs": [], "figures": []})
        outcome = outcomes.get(run)
        group["runs"].append({"run": run, "seed": s["seed"],
                              "status": outcome["status"] if outcome else "not run",
                              "reason": outcome.get("reason") if outcome else None})
        if outcome and outcome["status"] in ("finished", "diverged"):
            group["figures"].append({**run_figures(Path(study_dir) / run), "seed": s["seed"]})
    if timing is None:
        timing = read_timing(study_dir) or {}
    rounds = timing.get("settings", {})
    ref_figures = {f["seed"]: f for g in groups.values() if g["reference"]
                   for f in g["figures"]}
    ref_precision = next((g["precision"] for g in groups.values() if g["reference"]), "fp32")
    entries = [_entry(g, rounds.get(g["setting"], {}), ref_figures, ref_precision)
               for g in groups.values()]
    reference = next((e for e in entries if e["reference"]), None)
    if reference is not None:
        _judge_all(entries, reference, directions)
    return {"study_dir": str(study_dir), "task": plan.get("task"),
            "reference": reference["setting"] if reference else None,
            "timing": {"rounds": timing.get("rounds", 0), "skipped": timing.get("skipped")},
            "notes": list(plan.get("notes", [])),
            "settings": entries,
            "recommendation": (verdicts.recommend(entries, reference)
                               if reference is not None else None)}


def _entry(group: dict[str, Any], timed: Mapping[str, Any], ref_figures: dict[int, Any],
           ref_precision: str) -> dict[str, Any]:
    figures = group.pop("figures")
    rates = list(timed.get("rates", []))
    statuses = {r["status"] for r in group["runs"]}
    status = ("refused" if statuses == {"refused"} else "diverged" if "diverged" in statuses
              else "finished" if statuses == {"finished"} else "incomplete")
    metrics = sorted({k for f in figures for k in f.get("eval", {})})
    per_metric = {m: [f["eval"][m] for f in figures if m in f.get("eval", {})] for m in metrics}
    if not metrics and figures:  # no evaluation set: judge the final training loss
        per_metric = {"train_loss": [f["final_loss"] for f in figures
                                     if f.get("final_loss") is not None]}
    own = _mean([f.get("samples_per_s") for f in figures])
    nothing = (None if group["reference"] else
               verdicts.changed_nothing(group["precision"], figures, ref_figures, ref_precision,
                                        timed))
    return {**group, "status": status,
            "reason": next((r["reason"] for r in group["runs"] if r["reason"]), None),
            "seeds": len(figures),
            "samples_per_s": statistics.median(rates) if rates else own,
            "samples_per_s_source": "interleaved rounds" if rates else "the runs' own clocks",
            "run_samples_per_s": own, "rates": list(rates),
            "speed_spread": judge.relative_range(rates) if rates else None,
            "step_time_s": _mean([f.get("step_time_s") for f in figures]),
            "peak_memory_bytes": max((f["peak_memory_bytes"] for f in figures
                                      if f.get("peak_memory_bytes")), default=None),
            "peak_memory_source": next((f["peak_memory_source"] for f in figures
                                        if f.get("peak_memory_source")), None),
            "skipped_steps": sum(f.get("skipped_steps", 0) for f in figures),
            "nonfinite_steps": sum(f.get("nonfinite_steps", 0) for f in figures),
            "emulated": any(f.get("emulated") for f in figures),
            "fp8_converted": next((f["fp8_converted"] for f in figures
                                   if f.get("fp8_converted") is not None), None),
            "changed_nothing": nothing, "ran": timed.get("ran"),
            "values": per_metric}


def _judge_all(entries: list[dict[str, Any]], reference: dict[str, Any],
               directions: Mapping[str, str] | None) -> None:
    ref_name = reference["precision"]
    bands = {m: judge.Band.of(v) for m, v in reference["values"].items()}
    for e in entries:
        e["speed"] = ({"kind": "reference", "speedup": 1.0, "noise": e["speed_spread"],
                       "text": "reference"} if e is reference
                      else verdicts.speed_verdict(e["rates"], reference["rates"]))
        e["speedup"] = e["speed"]["speedup"] if e is not reference else 1.0
        e["metrics"] = {}
        for m, band in bands.items():
            values = e["values"].get(m, [])
            mean = _mean(values) if values else None
            spread = statistics.stdev(values) if len(values) >= 2 else None
            item: dict[str, Any] = {"mean": mean, "std": spread, "n": len(values)}
            if e is reference:
                item["verdict"], item["text"] = "reference", (
                    f"reference: {band.n} seed(s)"
                    + (f", ±{band.half_width:.3g} (2 std)" if band.half_width else ""))
            elif e["status"] in ("refused", "incomplete") or (
                    mean is None and e["status"] != "diverged"):
                item["verdict"], item["text"] = "none", e["status"]
            else:
                v = judge.judge(mean if mean is not None else math.nan, band,
                                judge.higher_is_better(m, directions),
                                diverged=e["status"] == "diverged", reference=ref_name)
                item["verdict"], item["text"] = v.kind, v.text
            e["metrics"][m] = item
