"""`redline doctor RUN_DIR`: where a finished (or running) run's step time went.

Reads only the run directory (config.yaml, environment.json, metrics.jsonl, system.jsonl,
events.jsonl), so it works on a run from another machine and never touches a device.
Every finding rests on logged evidence: a rule whose inputs are missing produces no
finding, only a note saying what was missing. Statistics are medians over the training
windows, because one slow window (a checkpoint, the allocator warming up) must not
decide the verdict; the first window is skipped as warm-up when there are >= 3.

Each check is one rule function in `RULES`, taking the run's `Evidence` and returning a
Finding or None; keys are read from telemetry/schema.py. Adding a check is adding a rule.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from redline.telemetry import schema as K
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


@dataclass
class Evidence:
    """A run directory's files, parsed once, and the training windows among its metrics."""

    cfg: dict[str, Any]
    env: dict[str, Any]
    metrics: list[dict[str, Any]]
    system: list[dict[str, Any]]
    events: list[dict[str, Any]]
    notes: list[str]

    def __post_init__(self) -> None:
        # Training windows: evaluation rows carry eval/... keys and no loss.
        self.train = [r for r in self.metrics if not any(K.is_eval(k) for k in r)
                      and (K.LOSS in r or K.STEP_TIME in r)]
        if self.metrics and not self.train:
            self.notes.append("metrics.jsonl has no training windows")
        self.kept = self.train[1:] if len(self.train) >= 3 else self.train
        self.kind = _get(self.env, "device.kind")
        self.gpu_rows = [r for r in self.system if _num(r.get(K.GPU_UTIL)) is not None]
        # NVML metrics exist only on a GPU: they identify CUDA when environment.json is gone.
        self.cuda = self.kind == "cuda" or (self.kind is None and bool(self.gpu_rows))
        self.data_wait = self.median(K.DATA_WAIT_PCT, "input-bound")
        self.step_time = _median(_series(self.kept, K.STEP_TIME))

    def median(self, key: str, check: str) -> float | None:
        """The key's median over the kept windows; a note when the windows lack it."""
        value = _median(_series(self.kept, key))
        if value is None and self.kept:
            self.notes.append(f"metrics.jsonl has no {key}: {check} check skipped")
        return value


Rule = Callable[[Evidence], "Finding | None"]


def input_bound(ev: Evidence) -> Finding | None:
    wait = ev.data_wait
    if wait is None or wait < INPUT_BOUND_PCT:
        return None
    workers = _get(ev.cfg, "data.num_workers")
    fixes = [f"raise data.num_workers (now {'unknown' if workers is None else workers})"]
    # pin_memory/persistent_workers "auto" already pin on CUDA and persist with workers;
    # only an explicit false needs changing.
    if ev.cuda and _get(ev.cfg, "data.pin_memory") is False:
        fixes.append("set data.pin_memory: true")
    if _get(ev.cfg, "data.persistent_workers") is False:
        fixes.append("set data.persistent_workers: true")
    return Finding("input-bound", "warning",
                   f"The loader held up training {_pct(wait)} % of the time (median over "
                   f"{len(ev.kept)} windows): " + " and ".join(fixes) + ".", wait)


def host_bound(ev: Evidence) -> Finding | None:
    """CUDA only: a CPU has no separate device to starve."""
    if not ev.cuda:
        return None
    util = _median(_series(_training_span(ev.gpu_rows, ev.train), K.GPU_UTIL))
    wait = ev.data_wait
    if util is None:
        ev.notes.append(f"system.jsonl has no {K.GPU_UTIL}: host-bound check skipped")
        return None
    if util >= GPU_BUSY_PCT:
        return None
    if wait is None:
        ev.notes.append(f"GPU utilisation was {_pct(util)} % but without {K.DATA_WAIT_PCT} "
                        "input-bound and host-bound cannot be told apart")
        return None
    if wait >= INPUT_BOUND_PCT:
        return None  # the loader explains it: input-bound says so
    syncs = _median(_series(ev.kept, K.HOST_SYNCS))
    sync_txt = f" (now {syncs:g} per window)" if syncs else ""
    return Finding("host-bound", "warning",
                   f"The GPU was busy only {_pct(util)} % of the time (median) while the "
                   f"loader waited {_pct(wait)} %: use a larger micro-batch (train.batch_size: "
                   f"auto), set precision.compile: true and cut host syncs{sync_txt}.", util)


def memory_headroom(ev: Evidence) -> Finding | None:
    mem = max(_series(ev.kept, K.MEM_PCT), default=None)
    total = _num(_get(ev.env, "device.memory_total"))
    budget = _get(ev.cfg, "memory.budget")
    if mem is None and total and budget is None:
        peaks = _series(ev.kept, K.MEM_PEAK)  # fall back on peak bytes / device memory
        mem = 100.0 * max(peaks) / total if peaks else None
    if mem is None:
        if ev.kept:
            ev.notes.append(f"metrics.jsonl has no {K.MEM_PCT} or {K.MEM_PEAK}: memory "
                            "check skipped")
        return None
    if mem >= HEADROOM_PCT:
        return None
    micro = _series(ev.kept, K.MICRO_BATCH)
    batch = int(micro[-1]) if micro else _get(ev.cfg, "train.batch_size")
    target = _num(_get(ev.cfg, "memory.target")) or 0.85
    of = ("the memory budget" if budget is not None
          else "physical memory" if ev.kind == "cpu" else "the device")
    return Finding("memory-headroom", "warning" if mem < HEADROOM_WARN_PCT else "info",
                   f"Peak memory was {_pct(mem)} % of {of} at micro-batch {batch}: set "
                   f"train.batch_size: auto to fill memory.target ({target * 100:.0f} %).", mem)


def precision(ev: Evidence) -> Finding | None:
    name = _get(ev.cfg, "precision.name")
    if name is None:
        ev.notes.append("config.yaml has no precision.name: precision check skipped")
        return None
    if name == "fp32" and _get(ev.env, "device.supports_bf16") is True \
            and _get(ev.env, "precisions.bf16-mixed") in (None, "ok") \
            and ev.kind in ("cuda", "cpu"):
        at = f" at {_secs(ev.step_time)} per step" if ev.step_time else ""
        # CPU bf16 speed depends on AMX/AVX512-BF16: only a measurement here can justify it.
        end = (" (redline study checks its quality against fp32)." if ev.kind == "cuda"
               else ", but only if redline study measures it faster on this machine.")
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
    fix = ("switch to precision.name: bf16-mixed." if _get(ev.env, "device.supports_bf16")
           is True else "lower train.lr or use precision.name: fp32.")
    return Finding("precision", "warning",
                   f"The fp16 loss scaler skipped {skipped} of {steps} steps "
                   f"({_pct(100 * skipped / steps)} %) on non-finite gradients: {fix}",
                   float(skipped))


def oom_retries(ev: Evidence) -> Finding | None:
    changes = [e for e in ev.events if e.get("event") == "micro_batch"]
    ooms = [e for e in changes if e.get("reason") == "oom"]
    if not ooms:
        return None
    final = changes[-1].get("new", "unknown")
    return Finding("oom-retries", "info",
                   f"The OOM guard shrank the micro-batch {len(ooms)} time"
                   f"{'s' if len(ooms) != 1 else ''} (final micro-batch {final}): set "
                   f"train.batch_size to {final} or auto to avoid the retries.",
                   float(len(ooms)))


RULES: list[Rule] = [input_bound, host_bound, memory_headroom, precision, oom_retries]


def telemetry_overhead(ev: Evidence) -> Finding | None:
    """About redline itself, not the run: reported after the verdict."""
    overhead = ev.median(K.OVERHEAD_PCT, "telemetry-overhead")
    if overhead is None:
        return None
    over = overhead > OVERHEAD_GOAL_PCT
    log_every = _get(ev.cfg, "telemetry.log_every")
    fix = (f"(median, goal < {OVERHEAD_GOAL_PCT} %): raise telemetry.log_every"
           + (f" (now {log_every})" if log_every is not None else "")
           + " or drop slow trackers" if over
           else f"(median), within the {OVERHEAD_GOAL_PCT} % goal")
    return Finding("telemetry-overhead", "warning" if over else "info",
                   f"Redline's own work took {_pct(overhead)} % of the training thread's "
                   f"time {fix}.", overhead)


def no_bottleneck(ev: Evidence, found: list[Finding]) -> Finding | None:
    """The verdict when nothing is wrong (only warnings count; infos are suggestions)."""
    if not ev.kept or any(f.severity == "warning" for f in found):
        return None
    n = len(ev.kept)
    rate = _median(_series(ev.kept, K.SAMPLES_PER_S))
    parts = ([f"{rate:,.1f} samples/s"] if rate else []) + (
        [f"{_secs(ev.step_time)} per step"] if ev.step_time else [])
    summary = " at " + " and ".join(parts) if parts else ""
    return Finding("ok", "info", f"No bottleneck found over {n} training window"
                   f"{'s' if n != 1 else ''}{summary}.", rate)


def load_evidence(run_dir: str | Path) -> Evidence:
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    if not any((root / name).is_file() for name in FILES):
        raise FileNotFoundError(f"{str(root)!r} holds none of {', '.join(FILES)}: "
                                "it is not a redline run directory")
    notes: list[str] = []
    cfg, env = (_read(root / name, notes) or {} for name in FILES[:2])
    metrics, system, events = (_read(root / name, notes) or [] for name in FILES[2:])
    return Evidence(cfg, env, metrics, system, events, notes)


def diagnose(run_dir: str | Path) -> tuple[list[Finding], list[str]]:
    """Findings about where the run's step time went, and notes on missing evidence."""
    ev = load_evidence(run_dir)
    found = [f for rule in RULES if (f := rule(ev)) is not None]
    overhead = telemetry_overhead(ev)
    verdict = no_bottleneck(ev, [*found, *([overhead] if overhead else [])])
    return [*found, *([verdict] if verdict else []), *([overhead] if overhead else [])], ev.notes


def _training_span(samples: list[dict[str, Any]],
                   train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System samples taken between the end of the warm-up window and the last window.

    Model building, autobatch probes and warm-up leave the GPU idle and would read as
    host-bound (a window's record is stamped at its end). Without timestamps: all samples.
    """
    times = _series(train, K.TIME)
    if len(times) < 2 or len(times) != len(train):
        return samples
    start = times[0] if len(train) >= 3 else -math.inf
    inside = [s for s in samples if start <= (_num(s.get(K.TIME)) or -math.inf) <= times[-1]]
    return inside or samples


def _skipped_steps(train: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(skipped steps, steps) over the whole run, warm-up included: skips are not timing.

    `skipped_steps` counts each window's own skips (schema.py), so the run's are their sum.
    """
    counts = _series(train, K.SKIPPED_STEPS)
    if not counts:
        return None, None
    steps = max(_series(train, K.STEP), default=None)
    return int(sum(counts)), int(steps) if steps else None


def render(findings: list[Finding], notes: list[str]) -> str:
    """Human text: one finding per line, warnings marked, then the notes."""
    lines = [f"{f.severity:<8} {f.kind:<19} {f.message}" for f in findings]
    lines += [f"note     {n}" for n in notes]
    return "\n".join(lines) if lines else "no findings"
