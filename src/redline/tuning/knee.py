"""The batch search's decisions on measured speeds: where the knee scan stops, which sizes
are timed again in rounds, and the size chosen against the start.

These are pure functions of the samples/s measured (batchsearch.py measures them), so
they are tested with numbers given, not timed on a loaded machine.

Samples/s is scanned at the powers of two from 1 up (and the start's size, the
micro-batch the run would have had without `auto`), one timing per size. A single timing
of 20-100 ms on a loaded machine can be off by 2x, so it never ends the scan on its own:
when the last two sizes look clearly slower (FALLEN) than the best so far, those two and
the best are timed again in interleaved rounds (`rounds`), and the scan stops only when
the rounds confirm the fall beyond their noise (both below the best by more than the
tolerance). Sizes whose timings are merely within noise of each other never stop it. It
also stops at a size that does not fit, and under redline tune's deadline: before a size
whose two steps (predicted from the last size's rate) would not fit in the time left,
after any size slower than the best so far when the next would take over a quarter of
the time left (PAST_KNEE_SHARE), and once the time is spent.

Every size scanned is then timed again in interleaved rounds with the start, except those
whose fall the rounds already confirmed (under a deadline, as many as the time left
allows: the start and the best first): no size is excluded on one timing. The choice is
judge.faster_than_start's: the start is kept unless a size beats it by more than the
tolerance (KNEE_TOLERANCE, or the rounds' noise if larger), and then the smallest size
that does and is within the tolerance of the best is chosen. A loaded machine widens the
tolerance, so it gives ties to the start, never a smaller batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from redline.judge import TIMING_TOLERANCE, faster_than_start, first_as_fast, timing_noise

KNEE_TOLERANCE = TIMING_TOLERANCE  # the least a size must be faster by to count as faster
FALLEN = 0.15  # one timing this far below the best: the fall is checked in rounds
NEAR = 0.08  # scanned within this of the best: first in line for the rounds
PAST_KNEE_SHARE = 0.25  # of the time left, the most a size past the top may take to scan

Progress = Callable[[str], None]
Measure = Callable[[int], "float | None"]
Rounds = Callable[[list[int]], dict[int, list[float]]]  # interleaved rounds of these sizes


class SizeFails(Exception):
    """`measure(size)` found the model cannot train at this size at all (e.g. BatchNorm
    with one sample per channel), though larger sizes ran: the size is skipped."""


@dataclass
class Scanned:
    """What the scan measured: each size's speed (its rounds' median where it had rounds),
    the rounds it had, and the sizes whose fall the rounds confirmed."""

    speeds: dict[int, float] = field(default_factory=dict)
    rounds: dict[int, list[float]] = field(default_factory=dict)
    fallen: list[int] = field(default_factory=list)
    stop: str = ""  # why the scan ended before the largest size, in words
    failed: dict[int, str] = field(default_factory=dict)  # sizes the model cannot run: why


def scan(sizes: list[int], measure: Measure, say: Progress,
         time_left: Callable[[], float] | None = None,
         rounds: Rounds | None = None) -> Scanned:
    """The knee scan (the module docstring's rules). `measure(size)` times a size once
    (None: it does not fit, and larger ones will not either; SizeFails: the model cannot
    train at this size, which is skipped); `rounds(sizes)` times sizes
    in interleaved rounds (None: single timings are trusted, as a test may want);
    `time_left()` is the seconds left under redline tune's deadline (None: no deadline).
    The rules decide on what these return, so a test can give them numbers and a clock."""
    out = Scanned()
    for s in sizes:
        why = _not_scanned(s, out.speeds, time_left)
        if why:
            say(why)
            out.stop = why
            break
        say(f"scanning micro-batch {s}")
        try:
            speed = measure(s)
        except SizeFails as e:
            out.failed[s] = str(e)
            say(f"micro-batch {s} skipped: the model cannot train at it ({e})")
            continue
        if speed is None:
            out.stop = f"micro-batch {s} does not fit the memory target"
            break
        out.speeds[s] = speed
        if fallen(list(out.speeds.values())) and _fall_confirmed(out, rounds, say):
            break
        if time_left is not None and time_left() <= 0 and len(out.speeds) >= 3:
            out.stop = f"the time budget is spent: the scan stops after micro-batch {s}"
            say(out.stop)
            break
    return out


def _not_scanned(size: int, speeds: dict[int, float],
                 time_left: Callable[[], float] | None) -> str | None:
    """Why `size` is not scanned under the deadline, or None."""
    if time_left is None or not speeds:
        return None
    left = time_left()
    last = speeds[max(speeds)]
    if 2 * size / last > max(left, 0.0) and len(speeds) >= 3:
        return (f"micro-batch {size} not scanned: its two steps would take about "
                f"{2 * size / last:.1f} s, over the {max(left, 0.0):.1f} s left")
    if too_costly_past_the_knee(size, speeds, left):
        return (f"micro-batch {size} not scanned: {max(speeds)} was already slower than the "
                "best, and timing it would take over a quarter of the time left")
    return None


def _fall_confirmed(out: Scanned, rounds: Rounds | None, say: Progress) -> bool:
    """The last two sizes looked clearly slower than the best: time them and the best in
    rounds (once each) and say whether the fall is beyond the rounds' noise."""
    if rounds is None:
        out.stop = "two sizes in a row clearly slower than the best"
        return True
    best = max(out.speeds, key=out.speeds.__getitem__)
    last = sorted(out.speeds)[-2:]
    todo = [s for s in (best, *last) if s not in out.rounds]
    if not todo:
        return False  # timed in rounds already, and not confirmed then
    say(f"micro-batches {', '.join(map(str, last))} look slower than {best}: timing them "
        "again in rounds")
    out.rounds.update(rounds(sorted({best, *last})))
    for s in (best, *last):
        out.speeds[s] = statistics.median(out.rounds[s])
    top = max(out.speeds.values())
    tolerance = max(KNEE_TOLERANCE, timing_noise([out.rounds[s] for s in (best, *last)]))
    if all(out.speeds[s] < (1 - tolerance) * top for s in last):
        out.fallen = last
        out.stop = (f"micro-batches {last[0]} and {last[1]} are slower than the best beyond "
                    f"the noise ({tolerance:.1%}), timed in rounds")
        say(out.stop)
        return True
    return False


def fallen(rates: list[float]) -> bool:
    """The last two of at least three sizes are both clearly (FALLEN) slower than the best."""
    best = max(rates)
    return len(rates) >= 3 and all(v < (1 - FALLEN) * best for v in rates[-2:])


def too_costly_past_the_knee(size: int, scanned: dict[int, float], time_left: float) -> bool:
    """Under a deadline, the size after one slower than the best so far is scanned only if
    its two steps (warm-up and timing), at the last size's rate, take at most
    PAST_KNEE_SHARE of the time left: past the top of the curve a size rarely wins, while
    the largest sizes are the slowest to time (reportgen-tiny's 2000 after 1024 fell
    15-35 %: 34-39 s of a 100 s search, at 7 GiB)."""
    if len(scanned) < 3:
        return False
    last = scanned[max(scanned)]
    if last >= max(scanned.values()):
        return False
    return 2 * size / last > PAST_KNEE_SHARE * time_left


def near_the_best(scanned: dict[int, float]) -> list[int]:
    """The scanned sizes within NEAR of the best."""
    best = max(scanned.values())
    return [s for s, v in scanned.items() if v >= (1 - NEAR) * best]


def to_time_in_rounds(scanned: Scanned, start: int | None,
                      time_left: float | None = None, round_s: float = 0.0,
                      step_s: Callable[[int], float] | None = None) -> list[int]:
    """The sizes timed again in the final rounds, ascending: every size scanned but those
    whose fall the rounds confirmed, the start always. Under a deadline (`time_left`),
    sizes join in order (start, best, near the best, the rest by cost) while the rounds'
    predicted time fits (each size: `round_s` per round, at least one step `step_s(s)`)."""
    speeds = scanned.speeds
    best = max(speeds, key=speeds.__getitem__)
    near = near_the_best(speeds)
    order = list(dict.fromkeys(s for s in (start, best) if s is not None and s in speeds))
    order += [s for s in near if s not in order and s not in scanned.fallen]
    order += sorted((s for s in speeds if s not in order and s not in scanned.fallen),
                    key=lambda s: s / speeds[s])
    if time_left is None or step_s is None:
        return sorted(order)
    chosen: list[int] = []
    used = 0.0
    for s in order:
        cost = 3 * max(round_s, step_s(s))
        if len(chosen) >= 2 and used + cost > time_left:
            break
        chosen.append(s)
        used += cost
    return sorted(chosen)


def choose_knee(rates: dict[int, list[float]], start: int | None = None
                ) -> tuple[int, float]:
    """(the size to train with, the tolerance it was chosen at) from each size's rounds.

    With a `start` among the sizes: the start, unless a size beats it beyond the
    tolerance (judge.faster_than_start; smaller sizes preferred after it). Without one:
    the smallest size within the tolerance of the best (judge.first_as_fast). The
    tolerance is the larger of KNEE_TOLERANCE and the rounds' noise, so differences inside
    the noise decide nothing and a busy machine keeps the start.
    """
    sizes = sorted(rates)  # the smallest is preferred: less memory
    if start is None or start not in rates:
        pick, tolerance = first_as_fast([rates[s] for s in sizes])
        return sizes[pick], tolerance
    order = [start, *(s for s in sizes if s != start)]
    pick, tolerance = faster_than_start([rates[s] for s in order], 0)
    return order[pick], tolerance


def knee_reason(rates: dict[int, list[float]], start: int | None, chosen: int, tolerance: float,
         stop: str) -> str:
    """The knee's reason in words, with the medians it was decided on."""
    med = {s: statistics.median(v) for s, v in rates.items()}
    if start is None:
        why = (f"micro-batch {chosen}: the smallest within {tolerance:.1%} of the best "
               "(no start to compare with)")
    elif chosen == start:
        best = max(med, key=med.__getitem__)
        why = (f"micro-batch {start} kept (the start): no size is faster beyond the noise "
               f"({tolerance:.1%}); the best, {best}, is "
               f"{med[best] / med[start] - 1:+.1%}")
    else:
        why = (f"micro-batch {chosen}: {med[chosen] / med[start] - 1:+.1%} over the start's "
               f"{start}, beyond the noise ({tolerance:.1%})")
    return why + (f"; the scan stopped: {stop}" if stop else "")
