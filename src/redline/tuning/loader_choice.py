"""Choosing the data loader's settings by measurement: workers, prefetch, pinning, persistence.

Loader workers only help when the training step waits for data, and on a machine with few
cores they take those cores from the step itself (on a 2-core CPU one worker made
sst-tiny 25 % slower). So the choice is measured on real steps (trial.Runner: the job's
own loader feeding the job's own step):

  1. the current settings with 0 workers are timed; the share of step time spent waiting
     on the loader is what workers could at most win. Under NEGLIGIBLE of it, 0 is kept
     without trying more (workers cost start-up time and memory for nothing);
  2. otherwise 1, 2, 4 ... workers (up to the cores but one, at most MAX_WORKERS) and,
     for the most, a deeper prefetch, are timed in interleaved rounds with 0 workers;
     the fastest is chosen only when it beats the fewest workers by more than the rounds'
     noise (judge.first_as_fast's rule: fewer workers win ties);
  3. `pin_memory` is timed on and off on CUDA (it speeds host-to-GPU copies, and costs
     page-locked memory); on a CPU there is no copy to speed and it stays off;
  4. `persistent_workers` is on whenever there are workers: they then start once instead
     of once an epoch, and a run of one epoch pays nothing for it.

`data.num_workers: auto` runs this when training starts (`resolve_auto_workers`), in a
second or two; `redline tune` runs it for the setting it chose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.judge import TIMING_TOLERANCE, first_as_fast
from redline.task import Task
from redline.tuning.trial import Timing, interleave, noise, runners

NEGLIGIBLE = 0.02  # a data-wait share below this: workers cannot win enough to matter
MAX_WORKERS = 8
ROUNDS = 3
MIN_TIMED_S = 0.2
_LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")


@dataclass
class LoaderRow:
    settings: dict[str, Any]  # the data.* keys this row set
    samples_per_s: float
    spread: float
    data_wait: float  # share of step time spent waiting on the loader


@dataclass
class LoaderChoice:
    settings: dict[str, Any]  # data.* keys to apply
    reasons: dict[str, str]  # data.* key -> why, in words
    rows: list[LoaderRow] = field(default_factory=list)

    def apply(self, config: RunConfig) -> RunConfig:
        return config.updated(_keys(self.settings))


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_counts(limit: int | None = None) -> list[int]:
    """0, 1, 2, 4, ... up to the cores but one (the step needs one), at most MAX_WORKERS."""
    top = min(MAX_WORKERS, cores() - 1) if limit is None else limit
    counts, n = [0], 1
    while n <= top:
        counts.append(n)
        n *= 2
    return counts


def choose_loader(task: Task, config: RunConfig, device: DeviceInfo,
                  say: Callable[[str], None] = lambda _: None,
                  rounds: int = ROUNDS, min_s: float = MIN_TIMED_S) -> LoaderChoice:
    """The loader settings for `config` (module docstring); its other settings are kept."""
    base = config.updated({"data.num_workers": 0, "data.pin_memory": False,
                           "data.persistent_workers": False})
    options = [{"num_workers": n} for n in worker_counts()]
    with runners(task, [base], device) as (zero,):
        say("data loading: timing 0 workers")
        alone = interleave([zero], 1, min_s)[0]
    reasons: dict[str, str] = {}
    why = keep_zero_workers(alone, len(options))
    if why:
        rows = [LoaderRow({"num_workers": 0}, alone.samples_per_s, alone.spread,
                          alone.data_wait)]
        chosen: dict[str, Any] = {"num_workers": 0}
        reasons["num_workers"] = f"0: {why}"
    else:
        most = options[-1]["num_workers"]
        options.append({"num_workers": most, "prefetch_factor": 4})
        chosen, rows, reasons["num_workers"] = _time_workers(task, base, device, options,
                                                             rounds, min_s, say)
    chosen.update(_pinning(task, base.updated(_keys(chosen)), device, rounds, min_s, say,
                           reasons))
    chosen["persistent_workers"] = _persistent(config, chosen, reasons)
    return LoaderChoice(chosen, reasons, rows)


def _keys(settings: dict[str, Any]) -> dict[str, Any]:
    return {f"data.{k}": v for k, v in settings.items()}


def _time_workers(task: Task, base: RunConfig, device: DeviceInfo,
                  options: list[dict[str, Any]], rounds: int, min_s: float,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], list[LoaderRow], str]:
    configs = [base.updated(_keys(o)) for o in options]
    with runners(task, configs, device) as built:
        for runner, o in zip(built, options, strict=True):
            say(f"data loading: starting {o['num_workers']} workers")
            runner.warm_up()
        timings = interleave(built, rounds, min_s, lambda i, r: say(
            f"data loading: timing {_label(options[i])} (round {r + 1} of {rounds})"))
    return choose_workers(options, timings)


def keep_zero_workers(alone: Timing, counts: int) -> str | None:
    """Why 0 workers is kept without timing more (`alone`: 0 workers' timing; `counts`: the
    worker counts this machine may try), or None: workers are worth timing."""
    if alone.data_wait < NEGLIGIBLE:
        return (f"the step waits {alone.data_wait:.1%} of its time for data with 0 workers: "
                "workers could win no more than that")
    if counts == 1:
        return "one core: a worker would take it from the step"
    return None


def choose_workers(options: list[dict[str, Any]], timings: list[Timing]
                   ) -> tuple[dict[str, Any], list[LoaderRow], str]:
    """(the settings chosen, a row each, why) from each option's interleaved timing,
    `options[0]` being 0 workers: the fastest beyond the noise, fewer workers winning ties."""
    rows = [LoaderRow(o, t.samples_per_s, t.spread, t.data_wait)
            for o, t in zip(options, timings, strict=True)]
    pick, tolerance = first_as_fast([t.rates for t in timings])  # fewer workers first
    fastest = max(range(len(timings)), key=lambda i: timings[i].samples_per_s)
    zero = timings[0]
    rates = ", ".join(f"{_label(o)} {t.samples_per_s:.1f} (data wait {t.data_wait:.0%})"
                      for o, t in zip(options, timings, strict=True))
    if pick == 0:
        why = (f"0: no worker setting is faster beyond the noise ({tolerance:.1%}): {rates} "
               "samples/s")
    else:
        why = (f"{_label(options[pick])}: {timings[pick].samples_per_s / zero.samples_per_s:.2f}x"
               f" 0 workers' samples/s: {rates}")
    if fastest != pick:
        why += (f"; {_label(options[fastest])} is within the noise of it, and fewer workers "
                "win ties")
    return dict(options[pick]), rows, why


def _label(option: dict[str, Any]) -> str:
    n = option["num_workers"]
    text = f"{n} worker{'s' if n != 1 else ''}"
    return text + (f", prefetch {option['prefetch_factor']}" if "prefetch_factor" in option
                   else "")


def _pinning(task: Task, config: RunConfig, device: DeviceInfo, rounds: int, min_s: float,
             say: Callable[[str], None], reasons: dict[str, str]) -> dict[str, Any]:
    if not device.is_cuda:
        reasons["pin_memory"] = ("off: no CUDA device (pinning only speeds host-to-GPU "
                                 "copies)")
        return {"pin_memory": False}
    configs = [config, config.updated({"data.pin_memory": True})]
    with runners(task, configs, device) as built:
        off, on = interleave(built, rounds, min_s, lambda i, r: say(
            f"data loading: timing pin_memory {'on' if i else 'off'} (round {r + 1})"))
    pin, reasons["pin_memory"] = choose_pinning(off, on)
    return {"pin_memory": pin}


def choose_pinning(off: Timing, on: Timing) -> tuple[bool, str]:
    """(pin, why) from pin_memory's timings off and on: on only when faster beyond the noise."""
    gain = on.samples_per_s / off.samples_per_s - 1
    pin = gain > max(TIMING_TOLERANCE, noise([off, on]))
    return pin, (f"{'on' if pin else 'off'}: pinned {gain:+.1%} samples/s "
                 f"({'beyond' if pin else 'within'} the noise)")


def _persistent(config: RunConfig, chosen: dict[str, Any], reasons: dict[str, str]) -> bool:
    if not chosen.get("num_workers"):
        reasons["persistent_workers"] = "off: no workers to keep"
        return False
    reasons["persistent_workers"] = ("on: the workers start once, not once an epoch (a run "
                                     "of one epoch pays nothing for it)")
    return True


def resolve_auto_workers(task: Task, config: RunConfig, device: DeviceInfo,
                         main: bool = True, saved: Path | None = None
                         ) -> tuple[RunConfig, dict[str, Any]]:
    """`data.num_workers: auto` -> the measured choice (module docstring) and what to record
    of it. `saved`: a resumed run's config.yaml, whose choice is kept (no new measurement)."""
    if config.data.num_workers != "auto":
        return config, {}
    if saved is not None and saved.is_file():
        data = (yaml.safe_load(saved.read_text()) or {}).get("data", {})
        keep = {k: v for k, v in data.items() if k in _LOADER_KEYS and v != "auto"}
        if main:
            print(f"data.num_workers: auto: {keep.get('num_workers')} (from {saved})",
                  file=sys.stderr, flush=True)
        return config.updated(_keys(keep)), {"settings": keep, "source": str(saved)}
    choice = choose_loader(task, config, device, rounds=ROUNDS, min_s=0.1)
    keep = {k: v for k, v in choice.settings.items()
            if k in ("num_workers", "prefetch_factor") or getattr(config.data, k) == "auto"}
    if main:
        print(f"data.num_workers: auto: {choice.reasons['num_workers']}", file=sys.stderr,
              flush=True)
    return config.updated(_keys(keep)), {"settings": keep, "reasons": choice.reasons}
