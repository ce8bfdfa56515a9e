"""The evidence `redline doctor RUN_DIR` reasons from: a run directory's files, parsed once.

Reads only the run directory (config.yaml, environment.json, metrics.jsonl, system.jsonl,
events.jsonl, and ranks.jsonl under torchrun), so it works on a run from another machine
and never touches a device. A file that is missing or unreadable becomes a note, never an error.
Who owns the loop (redline, a framework, one's own: advice.py) decides the words of advice.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from redline.diagnose import advice
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
SCALER_START_SKIPS = 16  # fp16's scaler halving from 2**16 to 1: its start-up, not a fault
MEMORY_BOUND_FRAC = 0.5  # a size the batch search stopped at for memory peaks near its target


@dataclass
class Finding:
    kind: str  # ended nonfinite memory-growth input-bound host-bound memory-headroom precision
    # oom-retries telemetry-overhead straggler ranks ok
    severity: str  # info | warning
    message: str  # one sentence, with its number and what to change
    value: float | None = None




Rule = Callable[["Evidence"], "Finding | None"]


def as_number(x: Any) -> float | None:
    """`x` as a float where it is a finite measurement, else None."""
    # bool is an int; non-finite floats are logged as strings ("NaN"): neither is a measurement.
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def lookup(d: dict[str, Any], dotted: str) -> Any:
    """`d["a"]["b"]` for "a.b"; None where a part is missing."""
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def series_of(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The rows' measurements of `key`, in order, without the missing and non-finite."""
    return [v for v in (as_number(r.get(key)) for r in rows) if v is not None]


def median_of(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def fmt_pct(x: float) -> str:
    """A percentage with the digits that matter (findings' text)."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def fmt_secs(s: float) -> str:
    """Seconds as "1.23 s" or "4.5 ms"."""
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
    run_dir: str = "RUN_DIR"
    """Where the files were read, as given: advice names it in the commands it shows."""
    ranks: list[dict[str, Any]] = field(default_factory=list)
    """ranks.jsonl: each rank's window figures (torchrun runs only)."""

    def __post_init__(self) -> None:
        # Training windows: evaluation rows carry eval/... keys and no loss.
        self.train = [r for r in self.metrics if not any(K.is_eval(k) for k in r)
                      and (K.LOSS in r or K.STEP_TIME in r)]
        if self.metrics and not self.train:
            self.notes.append("metrics.jsonl has no training windows")
        self.kept = self.train[1:] if len(self.train) >= 3 else self.train
        self.kind = lookup(self.env, "device.kind")
        self.gpu_rows = [r for r in self.system if as_number(r.get(K.GPU_UTIL)) is not None]
        # NVML metrics exist only on a GPU: they identify CUDA when environment.json is gone.
        self.cuda = self.kind == "cuda" or (self.kind is None and bool(self.gpu_rows))
        self.data_wait = self._data_wait()
        self.step_time = median_of(series_of(self.kept, K.STEP_TIME))
        # config.yaml holds the resolved micro-batch; the search's event says it was auto
        self.auto_batch = any(e.get("event") == "autobatch" for e in self.events)
        self.search = next((e for e in reversed(self.events) if e.get("event") == "autobatch"),
                           None)
        """What the batch search recorded (resolve_auto_batch): micro_batch, max_fit, ..."""
        self.loader_auto = next((e for e in reversed(self.events)
                                 if e.get("event") == "loader_auto"), None)
        self.owner = advice.owner(self.cfg)

    def says(self, what: str) -> str | None:
        """The words for a setting (advice.py) in this run's terms; None: it has none."""
        return advice.SETTINGS[self.owner].get(what)

    @property
    def framework(self) -> bool:
        return self.owner not in (advice.REDLINE, advice.OWN)

    def accumulation(self) -> int | None:
        """Micro-batches per optimizer step; None where the run does not say."""
        if self.framework:
            return advice.framework_accumulation(self.cfg)
        micro = series_of(self.kept, K.MICRO_BATCH)
        size = int(micro[-1]) if micro else as_number(lookup(self.cfg, "train.batch_size"))
        if not size:
            return None
        effective = as_number(lookup(self.cfg, "train.effective_batch_size"))
        ranks = as_number(lookup(self.env, "run.ranks")) or 1
        return max(1, int(effective // (size * ranks))) if effective else 1

    def _data_wait(self) -> float | None:
        """The loader's median share of the step; None (with a note) where a window
        records more than 100 %, which no share can be (a callback that timed across
        accumulated micro-batches), so none of them is a measurement to act on."""
        waits = series_of(self.kept, K.DATA_WAIT_PCT)
        if any(w > 100 for w in waits):
            self.notes.append(f"metrics.jsonl has {K.DATA_WAIT_PCT} above 100 %, which is "
                              "not a share of the step: input-bound check skipped")
            return None
        return self.median(K.DATA_WAIT_PCT, "input-bound")

    def median(self, key: str, check: str) -> float | None:
        """The key's median over the kept windows; a note when the windows lack it."""
        value = median_of(series_of(self.kept, key))
        if value is None and self.kept:
            self.notes.append(f"metrics.jsonl has no {key}: {check} check skipped")
        return value


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
    ranks = _read(root / "ranks.jsonl", []) or [] if (root / "ranks.jsonl").is_file() else []
    return Evidence(cfg, env, metrics, system, events, notes, str(run_dir), ranks)


