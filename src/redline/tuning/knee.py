"""The batch search's decisions on measured speeds: where the knee scan stops, and the knee.

These are pure functions of the samples/s measured (batchsearch.py measures them), so
they are tested with numbers given, not timed on a loaded machine.

Samples/s is scanned at the powers of two from 1 up, and the scan stops once two sizes in
a row are clearly slower (FALLEN) than the best so far, or once three doublings in a row
gained less than the knee's tolerance (saturated); under redline tune's deadline, also
after any size slower than the best so far when the next would take over a quarter of the
time left (PAST_KNEE_SHARE), and once the time is spent. The sizes near the best (NEAR)
are then timed again in interleaved rounds, and the *knee* is the smallest size within
2 % (or the rounds' noise) of the best: the size chosen.
"""

from __future__ import annotations

from collections.abc import Callable

from redline.judge import TIMING_TOLERANCE, first_as_fast

KNEE_TOLERANCE = TIMING_TOLERANCE  # the least a size must be faster by to count as faster
FALLEN = 0.15  # slower than the best by this much: clearly past the knee
NEAR = 0.08  # scanned within this of the best: timed again in rounds
PAST_KNEE_SHARE = 0.25  # of the time left, the most a size past the top may take to scan

Progress = Callable[[str], None]


def scan(sizes: list[int], measure: Callable[[int], float | None], say: Progress,
         time_left: Callable[[], float] | None = None) -> dict[int, float]:
    """The knee scan's sizes and their samples/s, in order (the module docstring's rules).

    `measure(size)` times a size (None: it does not fit, and larger ones will not either);
    `time_left()` is the seconds left under redline tune's deadline (None: no deadline).
    The rules decide on what these return, so a test can give them numbers and a clock.
    """
    scanned: dict[int, float] = {}
    for s in sizes:
        if time_left is not None and too_costly_past_the_knee(s, scanned, time_left()):
            say(f"micro-batch {s} not scanned: {max(scanned)} was already slower than the "
                "best, and timing it would take over a quarter of the time left")
            break
        say(f"scanning micro-batch {s}")
        speed = measure(s)
        if speed is None:
            break  # past the memory target: larger sizes do not fit either
        scanned[s] = speed
        if fallen(list(scanned.values())):
            break  # two sizes in a row clearly slower: larger ones will not win
        if saturated(list(scanned.values())):
            break  # three doublings in a row gained less than the knee's tolerance
        if time_left is not None and time_left() <= 0 and len(scanned) >= 3:
            say(f"the time budget is spent: the scan stops after micro-batch {s}")
            break
    return scanned


def near_the_best(scanned: dict[int, float]) -> list[int]:
    """The scanned sizes within NEAR of the best: those timed again in rounds."""
    best = max(scanned.values())
    return [s for s, v in scanned.items() if v >= (1 - NEAR) * best]


def fallen(rates: list[float]) -> bool:
    """The last two of at least three sizes are both clearly (FALLEN) slower than the best."""
    best = max(rates)
    return len(rates) >= 3 and all(v < (1 - FALLEN) * best for v in rates[-2:])


def too_costly_past_the_knee(size: int, scanned: dict[int, float], time_left: float) -> bool:
    """Under a deadline, the size after one slower than the best so far is scanned only if
    its two steps (warm-up and timing), at the last size's rate, take at most
    PAST_KNEE_SHARE of the time left: past the top of the curve a size rarely wins (and to
    be chosen it must beat the best by the knee's tolerance), while the largest sizes are
    the slowest to time (reportgen-tiny's 2000 after 1024 fell 15-35 %: 34-39 s of a
    100 s search, at 7 GiB)."""
    if len(scanned) < 3:
        return False
    last = scanned[max(scanned)]
    if last >= max(scanned.values()):
        return False
    return 2 * size / last > PAST_KNEE_SHARE * time_left


def saturated(rates: list[float]) -> bool:
    """The last three sizes each gained less than KNEE_TOLERANCE over every smaller size: an
    8x range of batch sizes with no gain. (Two in a row stopped sst-tiny's scan at 128 in
    one of three runs, on noise, where samples/s still rose 15 % to 1024.)"""
    if len(rates) < 5:
        return False
    return all(rates[i] < (1 + KNEE_TOLERANCE) * max(rates[:i]) for i in (-3, -2, -1))


def choose_knee(rates: dict[int, list[float]]) -> tuple[int, float]:
    """(the size to train with, the tolerance it was chosen at) from each size's rates.

    A size is as fast as the best when its median is within the tolerance: the larger of
    KNEE_TOLERANCE and the timing noise measured, the median relative spread of the
    sizes' rounds. The smallest such size is chosen. Differences inside the noise decide
    nothing, so a busy machine does not change the choice; where all sizes are within it,
    the choice is the smallest size whatever the load.
    """
    sizes = sorted(rates)  # the smallest is preferred: less memory, the smaller change
    pick, tolerance = first_as_fast([rates[s] for s in sizes])
    return sizes[pick], tolerance
