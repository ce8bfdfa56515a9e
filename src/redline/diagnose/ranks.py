"""Under torchrun: did the ranks keep pace, and if not, which one held the others up.

Every step the ranks agree once, just before the gradient all-reduce (engine/ranks.py); the
time a rank waits there is the time it waited for the slowest rank. Each window records
the largest such wait and the rank that waited least (the one the others waited for);
ranks.jsonl holds every rank's own figures, from which the slow rank's loader wait is
compared with the others'.
"""

from __future__ import annotations

from collections import Counter

from redline.diagnose import advice as A
from redline.diagnose.evidence import Evidence, Finding, as_number, fmt_pct, median_of, series_of
from redline.telemetry import schema as K

STRAGGLER_WAIT_PCT = 10.0  # a rank waiting this share of its step time for another
LOADER_GAP_PCT = 5.0  # the slow rank's loader wait exceeds the others' by this much


def straggler(ev: Evidence) -> Finding | None:
    windows = [r for r in ev.kept if as_number(r.get(K.WORLD_SIZE))]
    if not windows:
        return None
    ranks = int(windows[-1][K.WORLD_SIZE])
    wait = median_of(series_of(windows, K.SYNC_WAIT_MAX))
    if wait is None:  # timed at the step's agreement, which needs the OOM guard
        return Finding("ranks", "info", f"The {ranks} ranks' pace was not measured: without "
                       "memory.oom_guard there is no per-step agreement to time.")
    named = Counter(int(r[K.SLOWEST_RANK]) for r in windows if as_number(r.get(K.SLOWEST_RANK))
                    is not None)
    if wait < STRAGGLER_WAIT_PCT or not named:
        return Finding("ranks", "info", f"The {ranks} ranks kept pace: the most a rank waited "
                       f"for the others was {fmt_pct(wait)} % of its step time (median over "
                       f"{len(windows)} windows).", wait)
    rank, times = named.most_common(1)[0]
    return Finding("straggler", "warning",
                   f"Rank {rank} held up the others ({ranks} ranks): they waited up to "
                   f"{fmt_pct(wait)} % of their step time for it (median over {len(windows)} "
                   f"windows; it was the slowest in {times}). {_cause(ev, rank)}", wait)


def _cause(ev: Evidence, rank: int) -> str:
    rows = [r for r in ev.ranks if as_number(r.get(K.DATA_WAIT_PCT)) is not None]
    own = median_of(series_of([r for r in rows if r.get(K.RANK) == rank], K.DATA_WAIT_PCT))
    rest = median_of(series_of([r for r in rows if r.get(K.RANK) != rank], K.DATA_WAIT_PCT))
    if own is not None and rest is not None and own - rest >= LOADER_GAP_PCT:
        return (f"Its loader held it up {fmt_pct(own)} % of the time against {fmt_pct(rest)} % on "
                f"the others: raise {ev.says(A.WORKERS)}, or check its storage.")
    return ("Its loader is not the cause: check what else runs on its device or host "
            "(nvidia-smi, top), or its interconnect.")


RULES = [straggler]
