"""`redline doctor RUN_DIR`: where a finished (or running) run's step time went.

Reads only the run directory (config.yaml, environment.json, metrics.jsonl, system.jsonl,
events.jsonl), so it works on a run from another machine and never touches a device.
Every finding rests on logged evidence: a rule whose inputs are missing produces no
finding, only a note saying what was missing. Statistics are medians over the training
windows, because one slow window (a checkpoint, the allocator warming up) must not
decide the verdict; the first window is skipped as warm-up when there are >= 3.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from redline.telemetry.jsonl import read_jsonl

FILES = ("config.yaml", "environment.json", "metrics.jsonl", "system.jsonl", "events.jsonl")
INPUT_BOUND_PCT = 10.0  # data-wait share at which the loader is the bottleneck
GPU_BUSY_PCT = 60.0  # below this median utilisation the GPU is starved by the host
HEADROOM_PCT = 50.0  # peak memory below this leaves room for a larger micro-batch
HEADROOM_WARN_PCT = 25.0  # ... and below this much of the device is wasted
OVERHEAD_GOAL_PCT = 0.5  # DESIGN.md: telemetry overhead goal
SKIPPED_WARN_FRAC = 0.05  # fp16 scaler skips above this share of steps are not start-up noise
SKIPPED_WARN_MIN = 3


@dataclass
class Finding:
    kind: str  # input-bound host-bound memory-headroom precision telemetry-overhead oom-retries ok
    severity: str  # info | warning
    message: str  # one sentence, with its number and what to change
    value: float | None = None


def _num(x: Any) -> float | None:
    # bool is an int; non-finite floats are logged as strings ("NaN"): neither is a measurement.
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _get(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for v in (_num(r.get(key)) for r in rows) if v is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pct(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def _secs(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def _read(path: Path, notes: list[str]) -> Any:
    """Parsed content of one run file, or None (with a note) when missing or unreadable."""
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return None
    try:
        if path.suffix == ".jsonl":
            return [r for r in read_jsonl(path) if isinstance(r, dict)]
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        notes.append(f"{path.name} could not be read ({type(e).__name__})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} does not hold a mapping")
        return None
    return data


def diagnose(run_dir: str | Path) -> tuple[list[Finding], list[str]]:
    """Findings about where the run's step time went, and notes on missing evidence."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    if not any((root / name).is_file() for name in FILES):
        raise FileNotFoundError(f"{str(root)!r} holds none of {', '.join(FILES)}: "
                                "it is not a redline run directory")
    notes: list[str] = []
    cfg, env = (_read(root / name, notes) or {} for name in FILES[:2])
    metrics, system, events = (_read(root / name, notes) or [] for name in FILES[2:])

    # Training windows: evaluation rows carry eval/... keys and no loss.
    train = [r for r in metrics if not any(k.startswith("eval/") for k in r)
             and ("loss" in r or "step_time_s" in r)]
    if metrics and not train:
        notes.append("metrics.jsonl has no training windows")
    kept = train[1:] if len(train) >= 3 else train
    n = len(kept)
    out: list[Finding] = []

    def med(key: str, check: str) -> float | None:
        value = _median(_series(kept, key))
        if value is None and kept:
            notes.append(f"metrics.jsonl has no {key}: {check} check skipped")
        return value

    kind = _get(env, "device.kind")
    gpu_util_rows = [r for r in system if _num(r.get("gpu/util_pct")) is not None]
    # NVML metrics exist only on a GPU, so they identify CUDA when environment.json is gone.
    cuda = kind == "cuda" or (kind is None and bool(gpu_util_rows))

    # --- input-bound
    wait = med("data_wait_pct", "input-bound")
    if wait is not None and wait >= INPUT_BOUND_PCT:
        workers = _get(cfg, "data.num_workers")
        fixes = [f"raise data.num_workers (now {'unknown' if workers is None else workers})"]
        # pin_memory/persistent_workers "auto" already pin on CUDA and persist with workers;
        # only an explicit false needs changing.
        if cuda and _get(cfg, "data.pin_memory") is False:
            fixes.append("set data.pin_memory: true")
        if _get(cfg, "data.persistent_workers") is False:
            fixes.append("set data.persistent_workers: true")
        out.append(Finding("input-bound", "warning",
                           f"The loader held up training {_pct(wait)} % of the time (median "
                           f"over {n} windows): " + " and ".join(fixes) + ".", wait))

    # --- host-bound (CUDA only: a CPU has no separate device to starve)
    if cuda:
        util = _median(_series(_training_span(gpu_util_rows, train), "gpu/util_pct"))
        if util is None:
            notes.append("system.jsonl has no gpu/util_pct: host-bound check skipped")
        elif util < GPU_BUSY_PCT and wait is None:
            notes.append(f"GPU utilisation was {_pct(util)} % but without data_wait_pct "
                         "input-bound and host-bound cannot be told apart")
        elif util < GPU_BUSY_PCT and wait is not None and wait < INPUT_BOUND_PCT:
            syncs = _median(_series(kept, "redline/host_syncs"))
            sync_txt = f" (now {syncs:g} per window)" if syncs else ""
            out.append(Finding("host-bound", "warning",
                               f"The GPU was busy only {_pct(util)} % of the time (median) while "
                               f"the loader waited {_pct(wait)} %: use a larger micro-batch "
                               "(train.batch_size: auto), set precision.compile: true and cut "
                               f"host syncs{sync_txt}.", util))

    # --- memory headroom
    mem = max(_series(kept, "mem_pct"), default=None)
    total = _num(_get(env, "device.memory_total"))
    if mem is None and total and _get(cfg, "memory.budget") is None:
        peaks = _series(kept, "mem_peak_bytes")  # fall back on peak bytes / device memory
        mem = 100.0 * max(peaks) / total if peaks else None
    if mem is None and kept:
        notes.append("metrics.jsonl has no mem_pct or mem_peak_bytes: memory check skipped")
    if mem is not None and mem < HEADROOM_PCT:
        micro = _series(kept, "micro_batch")
        batch = int(micro[-1]) if micro else _get(cfg, "train.batch_size")
        target = _num(_get(cfg, "memory.target")) or 0.85
        of = "the memory budget" if _get(cfg, "memory.budget") is not None else "the device"
        out.append(Finding("memory-headroom", "warning" if mem < HEADROOM_WARN_PCT else "info",
                           f"Peak memory was {_pct(mem)} % of {of} at micro-batch {batch}: set "
                           f"train.batch_size: auto to fill memory.target ({target * 100:.0f} %).",
                           mem))

    # --- precision
    precision = _get(cfg, "precision.name")
    step_time = _median(_series(kept, "step_time_s"))
    if precision is None:
        notes.append("config.yaml has no precision.name: precision check skipped")
    elif precision == "fp32" and _get(env, "device.supports_bf16") is True \
            and _get(env, "precisions.bf16-mixed") in (None, "ok") and kind in ("cuda", "cpu"):
        at = f" at {_secs(step_time)} per step" if step_time else ""
        # CPU bf16 speed depends on AMX/AVX512-BF16: only a measurement here can justify it.
        end = (" (redline study checks its quality against fp32)." if kind == "cuda"
               else ", but only if redline study measures it faster on this machine.")
        out.append(Finding("precision", "info", f"The run used fp32{at} on a "
                           f"{'GPU' if kind == 'cuda' else 'CPU'} that supports bf16: try "
                           f"precision.name: bf16-mixed{end}", step_time))
    elif precision == "fp16-mixed":
        skipped, steps = _skipped_steps(train)
        if skipped is None:
            notes.append("metrics.jsonl has no skipped_steps: fp16 check skipped")
        elif steps and skipped >= SKIPPED_WARN_MIN and skipped / steps > SKIPPED_WARN_FRAC:
            out.append(Finding("precision", "warning",
                               f"The fp16 loss scaler skipped {skipped} of {steps} steps "
                               f"({_pct(100 * skipped / steps)} %) on non-finite gradients: "
                               + ("switch to precision.name: bf16-mixed."
                                  if _get(env, "device.supports_bf16") is True
                                  else "lower train.lr or use precision.name: fp32."),
                               float(skipped)))

    # --- OOM retries
    mb = [e for e in events if e.get("event") == "micro_batch"]
    ooms = [e for e in mb if e.get("reason") == "oom"]
    if ooms:
        final = mb[-1].get("new", "unknown")
        out.append(Finding("oom-retries", "info",
                           f"The OOM guard shrank the micro-batch {len(ooms)} time"
                           f"{'s' if len(ooms) != 1 else ''} (final micro-batch {final}): set "
                           f"train.batch_size to {final} or auto to avoid the retries.",
                           float(len(ooms))))

    # --- telemetry overhead (about redline itself, not the run: reported after the verdict)
    overhead = med("redline/overhead_pct", "telemetry-overhead")
    over = overhead is not None and overhead > OVERHEAD_GOAL_PCT

    # --- ok (only warnings mean something is wrong; infos are suggestions)
    if kept and not over and not any(f.severity == "warning" for f in out):
        rate = _median(_series(kept, "samples_per_s"))
        parts = ([f"{rate:,.1f} samples/s"] if rate else []) + (
            [f"{_secs(step_time)} per step"] if step_time else [])
        summary = " at " + " and ".join(parts) if parts else ""
        out.append(Finding("ok", "info", f"No bottleneck found over {n} training window"
                           f"{'s' if n != 1 else ''}{summary}.", rate))
    if overhead is not None:
        log_every = _get(cfg, "telemetry.log_every")
        fix = (f"(median, goal < {OVERHEAD_GOAL_PCT} %): raise telemetry.log_every"
               + (f" (now {log_every})" if log_every is not None else "")
               + " or drop slow trackers" if over
               else f"(median), within the {OVERHEAD_GOAL_PCT} % goal")
        out.append(Finding("telemetry-overhead", "warning" if over else "info",
                           f"Redline's own work took {_pct(overhead)} % of the training "
                           f"thread's time {fix}.", overhead))
    return out, notes


def _training_span(samples: list[dict[str, Any]],
                   train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System samples taken between the end of the warm-up window and the last window.

    Model building, autobatch probes and warm-up leave the GPU idle and would read as
    host-bound (a window's record is stamped at its end). Without timestamps: all samples.
    """
    times = _series(train, "time")
    if len(times) < 2 or len(times) != len(train):
        return samples
    start = times[0] if len(train) >= 3 else -math.inf
    inside = [s for s in samples if start <= (_num(s.get("time")) or -math.inf) <= times[-1]]
    return inside or samples


def _skipped_steps(train: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(skipped steps, steps) over the whole run, warm-up included: skips are not timing."""
    counts = _series(train, "skipped_steps")
    if not counts:
        return None, None
    # The engine's counter is cumulative (a running total per window); a series that ever
    # decreases must be per-window counts instead, so sum those.
    cumulative = all(b >= a for a, b in itertools.pairwise(counts))
    skipped = int(counts[-1] if cumulative else sum(counts))
    steps = max(_series(train, "step"), default=None)
    return skipped, int(steps) if steps else None


def render(findings: list[Finding], notes: list[str]) -> str:
    """Human text: one finding per line, warnings marked, then the notes."""
    lines = [f"{f.severity:<8} {f.kind:<19} {f.message}" for f in findings]
    lines += [f"note     {n}" for n in notes]
    return "\n".join(lines) if lines else "no findings"
