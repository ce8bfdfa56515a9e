"""Where a run's step time went: the loader, the host, memory left unused, the precision,
OOM retries, and redline's own overhead. One rule function per check.
"""

from __future__ import annotations

import math
from typing import Any

from redline.diagnose.evidence import (
    GPU_BUSY_PCT,
    HEADROOM_PCT,
    HEADROOM_WARN_PCT,
    INPUT_BOUND_PCT,
    OVERHEAD_GOAL_PCT,
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
    workers = lookup(ev.cfg, "data.num_workers")
    fixes = [f"raise data.num_workers (now {'unknown' if workers is None else workers}) "
             "or set it to auto, which measures which count is fastest"]
    # pin_memory/persistent_workers "auto" already pin on CUDA and persist with workers;
    # only an explicit false needs changing.
    if ev.cuda and lookup(ev.cfg, "data.pin_memory") is False:
        fixes.append("set data.pin_memory: true")
    if lookup(ev.cfg, "data.persistent_workers") is False:
        fixes.append("set data.persistent_workers: true")
    return Finding("input-bound", "warning",
                   f"The loader held up training {fmt_pct(wait)} % of the time (median over "
                   f"{len(ev.kept)} windows): " + " and ".join(fixes) + ".", wait)


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
    fixes = ([] if ev.auto_batch else ["use a larger micro-batch (train.batch_size: auto)"]) \
        + ([] if lookup(ev.cfg, "precision.compile") is True
           else ["set precision.compile: true"]) \
        + [f"cut host syncs (now {syncs:g} per window)" if syncs else "cut host syncs"]
    return Finding("host-bound", "warning",
                   f"The GPU was busy only {fmt_pct(util)} % of the time (median) while the "
                   f"loader waited {fmt_pct(wait)} %: " + ", ".join(fixes) + ".", util)


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
    target = as_number(lookup(ev.cfg, "memory.target")) or 0.85
    of = ("the memory budget" if budget is not None
          else "physical memory" if ev.kind == "cpu" else "the device")
    if ev.auto_batch:  # the search chose this size: it is the fastest, not the largest
        fix = ("the batch search chose it as the fastest size (a larger one was not "
               "faster)" if target >= 1 else f"raise memory.target (now {target:g}) to let "
               "the batch search try larger sizes")
    else:
        fix = f"set train.batch_size: auto to fill memory.target ({target * 100:.0f} %)"
    return Finding("memory-headroom", "warning" if mem < HEADROOM_WARN_PCT else "info",
                   f"Peak memory was {fmt_pct(mem)} % of {of} at micro-batch {batch}: {fix}.", mem)


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
                       f"precision.name: bf16-mixed{end}", ev.step_time)
    if name != "fp16-mixed":
        return None
    skipped, steps = _skipped_steps(ev.train)
    if skipped is None:
        ev.notes.append(f"metrics.jsonl has no {K.SKIPPED_STEPS}: fp16 check skipped")
        return None
    if not steps or skipped < SKIPPED_WARN_MIN or skipped / steps <= SKIPPED_WARN_FRAC:
        return None
    fix = ("switch to precision.name: bf16-mixed." if lookup(ev.env, "device.supports_bf16")
           is True else "lower train.lr or use precision.name: fp32.")
    return Finding("precision", "warning",
                   f"The fp16 loss scaler skipped {skipped} of {steps} steps "
                   f"({fmt_pct(100 * skipped / steps)} %) on non-finite gradients: {fix}",
                   float(skipped))


def oom_retries(ev: Evidence) -> Finding | None:
    changes = [e for e in ev.events if e.get("event") == "micro_batch"]
    ooms = [e for e in changes if e.get("reason") == "oom"]
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
    fix = (f"(median, goal < {OVERHEAD_GOAL_PCT} %): raise telemetry.log_every"
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
    """(skipped steps, steps) over the whole run, warm-up included: skips are not timing.

    `skipped_steps` counts each window's own skips (schema.py), so the run's are their sum.
    """
    counts = series_of(train, K.SKIPPED_STEPS)
    if not counts:
        return None, None
    steps = max(series_of(train, K.STEP), default=None)
    return int(sum(counts)), int(steps) if steps else None


