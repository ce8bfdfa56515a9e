"""Where a run's step time went: the loader, the host, memory left unused, the precision,
OOM retries, and redline's own overhead. One rule function per check.

Each piece of advice rests on what the run recorded, in the terms of whoever owns the loop
(advice.py): the batch search's own record says whether memory stopped it, a measured
`num_workers: auto` says more workers were not faster, a run without accumulation has no
larger micro-batch that keeps its recipe, and a framework run is never told a redline key.
"""

from __future__ import annotations

import math
from typing import Any

from redline.diagnose import advice as A
from redline.diagnose.evidence import (
    GPU_BUSY_PCT,
    HEADROOM_PCT,
    HEADROOM_WARN_PCT,
    INPUT_BOUND_PCT,
    MEMORY_BOUND_FRAC,
    OVERHEAD_GOAL_PCT,
    SCALER_START_SKIPS,
    SKIPPED_WARN_FRAC,
    SKIPPED_WARN_MIN,
    Evidence,
    Finding,
    as_number,
    fmt_pct,
    fmt_secs,
    lookup,
    median_of,
    series_of,
)
from redline.telemetry import schema as K


def input_bound(ev: Evidence) -> Finding | None:
    wait = ev.data_wait
    if wait is None or wait < INPUT_BOUND_PCT:
        return None
    fixes = [_more_workers(ev)]
    # pin_memory/persistent_workers "auto" already pin on CUDA and persist with workers;
    # only an explicit false needs changing (redline's keys; elsewhere: unknown, not said).
    if ev.cuda and lookup(ev.cfg, "data.pin_memory") is False:
        fixes.append(ev.says(A.PIN) or "")
    if lookup(ev.cfg, "data.persistent_workers") is False:
        fixes.append(ev.says(A.PERSIST) or "")
    return Finding("input-bound", "warning",
                   f"The loader held up training {fmt_pct(wait)} % of the time (median over "
                   f"{len(ev.kept)} windows): " + " and ".join(f for f in fixes if f) + ".",
                   wait)


def _more_workers(ev: Evidence) -> str:
    """More loader workers, unless `num_workers: auto` measured that more are not faster."""
    setting = ev.says(A.WORKERS)
    workers = lookup(ev.cfg, "data.num_workers") if ev.owner == A.REDLINE else None
    if ev.owner != A.REDLINE:
        return f"raise {setting}, or make loading a sample cheaper"
    chosen = (ev.loader_auto or {}).get("settings", {}).get("num_workers")
    if ev.loader_auto is not None and "reasons" in ev.loader_auto and chosen is not None:
        return (f"data.num_workers: auto measured {chosen} as the fastest count, so more "
                "workers do not help: make loading a sample cheaper (decode once, cache)")
    return (f"raise {setting} (now {'unknown' if workers is None else workers}) or set it to "
            "auto, which measures which count is fastest")


def host_bound(ev: Evidence) -> Finding | None:
    """CUDA only: a CPU has no separate device to starve."""
    if not ev.cuda:
        return None
    util = median_of(series_of(_training_span(ev.gpu_rows, ev.train), K.GPU_UTIL))
    wait = ev.data_wait
    if util is None:
        ev.notes.append(f"system.jsonl has no {K.GPU_UTIL}: host-bound check skipped")
        return None
    if util >= GPU_BUSY_PCT:
        return None
    if wait is None:
        ev.notes.append(f"GPU utilisation was {fmt_pct(util)} % but without {K.DATA_WAIT_PCT} "
                        "input-bound and host-bound cannot be told apart")
        return None
    if wait >= INPUT_BOUND_PCT:
        return None  # the loader explains it: input-bound says so
    syncs = median_of(series_of(ev.kept, K.HOST_SYNCS))
    fixes = [f for f in (_fewer_micro_batches(ev), _compile(ev)) if f] \
        + [f"cut host syncs (now {syncs:g} per window)" if syncs else "cut host syncs"]
    return Finding("host-bound", "warning",
                   f"The GPU was busy only {fmt_pct(util)} % of the time (median) while the "
                   f"loader waited {fmt_pct(wait)} %: " + ", ".join(fixes) + ".", util)


def _fewer_micro_batches(ev: Evidence) -> str | None:
    """Larger micro-batches that keep the recipe: only where the step accumulates several
    (without accumulation a larger one is a larger effective batch, a recipe change), and
    not where redline's batch search already chose them."""
    accumulation = ev.accumulation()
    if accumulation is None or accumulation < 2 or (ev.owner == A.REDLINE and ev.auto_batch):
        return None
    return ev.says(A.FEWER_MICRO)


def _compile(ev: Evidence) -> str | None:
    if ev.owner == A.REDLINE:
        return None if lookup(ev.cfg, "precision.compile") is True else ev.says(A.COMPILE)
    return f"{ev.says(A.COMPILE)} if it is not compiled yet"


def memory_headroom(ev: Evidence) -> Finding | None:
    mem = max(series_of(ev.kept, K.MEM_PCT), default=None)
    total = as_number(lookup(ev.env, "device.memory_total"))
    budget = lookup(ev.cfg, "memory.budget")
    if mem is None and total and budget is None:
        peaks = series_of(ev.kept, K.MEM_PEAK)  # fall back on peak bytes / device memory
        mem = 100.0 * max(peaks) / total if peaks else None
    if mem is None:
        if ev.kept:
            ev.notes.append(f"metrics.jsonl has no {K.MEM_PCT} or {K.MEM_PEAK}: memory "
                            "check skipped")
        return None
    if mem >= HEADROOM_PCT:
        return None
    micro = series_of(ev.kept, K.MICRO_BATCH)
    batch = int(micro[-1]) if micro else lookup(ev.cfg, "train.batch_size")
    of = ("the memory budget" if budget is not None
          else "physical memory" if ev.kind == "cpu" else "the device")
    fix = _search_stopped_for_memory(ev) if ev.owner == A.REDLINE and ev.auto_batch \
        else _fewer_micro_batches(ev)
    if fix is None:
        return None
    return Finding("memory-headroom", "warning" if mem < HEADROOM_WARN_PCT else "info",
                   f"Peak memory was {fmt_pct(mem)} % of {of} at micro-batch {batch}: {fix}.", mem)


def _search_stopped_for_memory(ev: Evidence) -> str | None:
    """The batch search's size with memory to spare: raising memory.target helps only
    where memory is what stopped it, i.e. it chose the largest size that fits (not one
    below it, for speed) and that size's peak came near its target (not a size capped by
    the training set or the effective batch). Else None: nothing to raise."""
    search, target = ev.search or {}, as_number(lookup(ev.cfg, "memory.target")) or 0.85
    chosen, largest = as_number(search.get("micro_batch")), as_number(search.get("max_fit"))
    budget = as_number(search.get("budget_bytes"))
    peak = max(series_of(ev.kept, K.MEM_PEAK), default=None)
    if chosen is None or largest is None or budget is None or peak is None:
        ev.notes.append("the batch search's record (micro_batch, max_fit, budget_bytes) or "
                        f"{K.MEM_PEAK} is missing: memory-target advice skipped")
        return None
    if chosen < largest or target >= 1 or peak < MEMORY_BOUND_FRAC * target * budget:
        return None
    return (f"the batch search stopped at micro-batch {chosen:g} for memory, so raise "
            f"memory.target (now {target:g}) to let it try larger sizes")


def precision(ev: Evidence) -> Finding | None:
    name = lookup(ev.cfg, "precision.name")
    if name is None:
        ev.notes.append("config.yaml has no precision.name: precision check skipped")
        return None
    if name == "fp32" and lookup(ev.env, "device.supports_bf16") is True \
            and lookup(ev.env, "precisions.bf16-mixed") in (None, "ok") \
            and ev.kind in ("cuda", "cpu"):
        at = f" at {fmt_secs(ev.step_time)} per step" if ev.step_time else ""
        # CPU bf16 speed depends on AMX/AVX512-BF16: only a measurement here can justify it.
        end = (", after checking a short run's loss against fp32's." if ev.kind == "cuda"
               else ", but only if a short run measures it faster on this machine.")
        return Finding("precision", "info", f"The run used fp32{at} on a "
                       f"{'GPU' if ev.kind == 'cuda' else 'CPU'} that supports bf16: try "
                       f"{ev.says(A.BF16)}{end}", ev.step_time)
    if name != "fp16-mixed":
        return None
    skipped, steps = _skipped_steps(ev.train)
    if skipped is None:
        ev.notes.append(f"metrics.jsonl has no {K.SKIPPED_STEPS}: fp16 check skipped")
        return None
    if not steps or skipped < SKIPPED_WARN_MIN or skipped / steps <= SKIPPED_WARN_FRAC:
        return None
    fix = (f"switch to {ev.says(A.BF16)}." if lookup(ev.env, "device.supports_bf16")
           is True else f"lower {ev.says(A.LR)} or use {ev.says(A.FP32)}.")
    return Finding("precision", "warning",
                   f"The fp16 loss scaler skipped {skipped} of {steps} steps "
                   f"({fmt_pct(100 * skipped / steps)} %) on non-finite gradients: {fix}",
                   float(skipped))


def oom_retries(ev: Evidence) -> Finding | None:
    changes = [e for e in ev.events if e.get("event") == "micro_batch"]
    ooms = [e for e in changes if e.get("reason") == "oom"]
    if ev.owner != A.REDLINE:
        return None  # the OOM guard and its settings are redline train's
    if not ooms or any(e.get("event") == "failed" and e.get("error") == "OutOfMemoryAtMinimum"
                       for e in ev.events):
        return None  # no size fitted: `ended` says so, and no batch size is the fix
    final = changes[-1].get("new", "unknown")
    fitted = min(int(e["new"]) for e in ooms if isinstance(e.get("new"), int))
    if ev.auto_batch:  # the search's own size ran out: leave it more room
        target = as_number(lookup(ev.cfg, "memory.target")) or 0.85
        fix = f"lower memory.target (now {target:g}) so the batch search leaves more room"
    else:
        fix = f"set train.batch_size to {fitted} or auto to avoid the retries"
    return Finding("oom-retries", "info",
                   f"The OOM guard shrank the micro-batch {len(ooms)} time"
                   f"{'s' if len(ooms) != 1 else ''} (final micro-batch {final}): {fix}.",
                   float(len(ooms)))


RULES = [input_bound, host_bound, memory_headroom, precision, oom_retries]


def telemetry_overhead(ev: Evidence) -> Finding | None:
    """About redline itself, not the run: reported after the verdict."""
    overhead = ev.median(K.OVERHEAD_PCT, "telemetry-overhead")
    if overhead is None:
        return None
    over = overhead > OVERHEAD_GOAL_PCT
    log_every = lookup(ev.cfg, "telemetry.log_every")
    fix = (f"(median, goal < {OVERHEAD_GOAL_PCT} %): raise {ev.says(A.LOG_EVERY)}"
           + (f" (now {log_every})" if log_every is not None else "")
           + " or drop slow trackers" if over
           else f"(median), within the {OVERHEAD_GOAL_PCT} % goal")
    return Finding("telemetry-overhead", "warning" if over else "info",
                   f"Redline's own work took {fmt_pct(overhead)} % of the training thread's "
                   f"time {fix}.", overhead)


def no_bottleneck(ev: Evidence, found: list[Finding]) -> Finding | None:
    """The verdict when nothing is wrong (only warnings count; infos are suggestions)."""
    if not ev.kept or any(f.severity == "warning" for f in found):
        return None
    n = len(ev.kept)
    rate = median_of(series_of(ev.kept, K.SAMPLES_PER_S))
    parts = ([f"{rate:,.1f} samples/s"] if rate else []) + (
        [f"{fmt_secs(ev.step_time)} per step"] if ev.step_time else [])
    summary = " at " + " and ".join(parts) if parts else ""
    return Finding("ok", "info", f"No bottleneck found over {n} training window"
                   f"{'s' if n != 1 else ''}{summary}.", rate)


def _training_span(samples: list[dict[str, Any]],
                   train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System samples taken between the end of the warm-up window and the last window.

    Model building, autobatch probes and warm-up leave the GPU idle and would read as
    host-bound (a window's record is stamped at its end). Without timestamps: all samples.
    """
    times = series_of(train, K.TIME)
    if len(times) < 2 or len(times) != len(train):
        return samples
    start = times[0] if len(train) >= 3 else -math.inf
    inside = [s for s in samples if start <= (as_number(s.get(K.TIME)) or -math.inf) <= times[-1]]
    return inside or samples


def _skipped_steps(train: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(skipped steps, steps) over the whole run, less the scaler's start-up: skips are
    not timing, so the warm-up window counts, but up to SCALER_START_SKIPS of its skips
    are the scaler halving from 65536 to a scale that fits, which is its normal working.

    `skipped_steps` counts each window's own skips (schema.py), so the run's are their sum.
    """
    counts = series_of(train, K.SKIPPED_STEPS)
    if not counts:
        return None, None
    steps = max(series_of(train, K.STEP), default=None)
    return int(sum(counts) - min(counts[0], SCALER_START_SKIPS)), int(steps) if steps else None
