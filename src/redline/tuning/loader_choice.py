"""Choosing the data loader's settings by measurement: workers, prefetch, pinning, persistence.

Loader workers only help when the training step waits for data, and on a machine with few
cores they take those cores from the step itself (on a 2-core CPU one worker made
sst-tiny 25 % slower). So the choice is measured on real steps (trial.Runner: the job's
own loader feeding the job's own step):

  The start is the user's setting (`num_workers: auto` starts from 0): every other
  setting is adopted only when faster than the start by more than the rounds' noise
  (judge.faster_than_start), timed in the same interleaved rounds.

  1. with a start of 0 workers, it is timed alone first; the share of step time spent
     waiting on the loader is what workers could at most win. Under NEGLIGIBLE of it, 0
     is kept without trying more (workers cost start-up time and memory for nothing);
  2. otherwise the start, then 0, 1, 2, 4 ... workers (up to the cores but one, at most
     MAX_WORKERS) and, for the most, a deeper prefetch, are timed in interleaved rounds;
     the start is kept unless one beats it beyond the noise (then fewer workers win ties);
  3. `pin_memory` is timed on and off on CUDA (it speeds host-to-GPU copies, and costs
     page-locked memory), the start's setting kept unless the other beats it beyond the
     noise; on a CPU there is no copy to speed and it stays off;
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
from redline.judge import faster_than_start
from redline.task import Task
from redline.tuning.trial import Timing, interleave, runners

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
    rounds: list[float] = field(default_factory=list)  # every round's samples/s


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
    start = config.data.num_workers if isinstance(config.data.num_workers, int) else 0
    pinned = config.data.pin_memory is True
    base = config.updated({"data.num_workers": 0, "data.pin_memory": pinned,
                           "data.persistent_workers": False})
    options = [{"num_workers": n} for n in [start, *(n for n in worker_counts() if n != start)]]
    reasons: dict[str, str] = {}
    why = None
    if start == 0:
        with runners(task, [base], device) as (zero,):
            say("data loading: timing 0 workers")
            alone = interleave([zero], 1, min_s)[0]
        why = keep_zero_workers(alone, len(options))
    if why:
        rows = [LoaderRow({"num_workers": 0}, alone.samples_per_s, alone.spread,
                          alone.data_wait, list(alone.rates))]
        chosen: dict[str, Any] = {"num_workers": 0}
        reasons["num_workers"] = f"0: {why}"
    else:
        most = max(o["num_workers"] for o in options)
        if most:
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
    `options[0]` being the start (the user's workers): the start unless another beats it
    beyond the noise (judge.faster_than_start), fewer workers winning ties after it."""
    rows = [LoaderRow(o, t.samples_per_s, t.spread, t.data_wait, list(t.rates))
            for o, t in zip(options, timings, strict=True)]
    order = [0, *sorted(range(1, len(options)), key=lambda i: (options[i]["num_workers"],
                                                              "prefetch_factor" in options[i]))]
    pick_at, tolerance = faster_than_start([timings[i].rates for i in order], 0)
    pick = order[pick_at]
    fastest = max(range(len(timings)), key=lambda i: timings[i].samples_per_s)
    first = timings[0]
    start = options[0]["num_workers"]
    rates = ", ".join(f"{_label(o)} {t.samples_per_s:.1f} (data wait {t.data_wait:.0%})"
                      for o, t in zip(options, timings, strict=True))
    if pick == 0:
        why = (f"{start} (the start): no worker setting is faster beyond the noise "
               f"({tolerance:.1%}): {rates} samples/s")
    else:
        why = (f"{_label(options[pick])}: {timings[pick].samples_per_s / first.samples_per_s:.2f}x"
               f" the start's ({start} workers) samples/s, beyond the noise "
               f"({tolerance:.1%}): {rates}")
    if fastest != pick:
        why += (f"; {_label(options[fastest])} is within the noise of it, and the start, "
                "then fewer workers, win ties")
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
    start = config.data.pin_memory is True
    configs = [config, config.updated({"data.pin_memory": not start})]
    with runners(task, configs, device) as built:
        kept, other = interleave(built, rounds, min_s, lambda i, r: say(
            f"data loading: timing pin_memory {'on' if (i == 0) == start else 'off'} "
            f"(round {r + 1})"))
    off, on = (other, kept) if start else (kept, other)
    pin, reasons["pin_memory"] = choose_pinning(off, on, start)
    return {"pin_memory": pin}


def choose_pinning(off: Timing, on: Timing, start: bool = False) -> tuple[bool, str]:
    """(pin, why) from pin_memory's timings off and on: the start's setting (off unless
    the user pinned) unless the other is faster beyond the noise."""
    first, second = (on, off) if start else (off, on)
    pick, _ = faster_than_start([first.rates, second.rates], 0)
    pin = start if pick == 0 else not start
    gain = on.samples_per_s / off.samples_per_s - 1
    return pin, (f"{'on' if pin else 'off'}{' (the start)' if pin == start else ''}: pinned "
                 f"{gain:+.1%} samples/s ({'within' if pin == start else 'beyond'} the "
                 "noise)")


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
