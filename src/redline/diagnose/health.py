"""How a run went: how it ended, its non-finite steps, memory that kept growing.

Each rule reads the run's events and windows; none needs a device. A run that ended
early is told by its last events: `failed` (an exception: out of memory at a micro-batch
of 1, a crash in the task, a file-system fault, the run stopping itself on non-finite
steps), `interrupted` (a signal), or nothing at all after its last window (killed: the
kernel's OOM killer or kill -9).
"""

from __future__ import annotations

from redline.diagnose import advice as A
from redline.diagnose.evidence import Evidence, Finding, lookup, series_of
from redline.telemetry import schema as K
from redline.telemetry.trend import growth

_WHY = {"OutOfMemoryAtMinimum": "out of memory even at a micro-batch of 1",
        "OutOfMemoryError": "out of memory", "RunStopped": "stopping itself",
        "StorageError": "a file-system fault (read-only, full disk)",
        "KeyboardInterrupt": "a second Ctrl-C"}


def _go_on(ev: Evidence, saved: list[int]) -> str:
    """The command that goes on: resume from a checkpoint, or start again from the run's
    resolved config (config.yaml holds the task) where there is none to resume; a run
    redline did not drive goes on the way its own loop does."""
    if ev.owner != A.REDLINE:
        return f"go on with {ev.says(A.RESUME)}"
    config = f"redline train --config {ev.run_dir}/config.yaml"
    if not saved:
        return f"start it again with {config}"
    return f"continue with {config} --run-dir {ev.run_dir} --resume"


def ended(ev: Evidence) -> Finding | None:
    """A run that did not reach its last step, and how to go on."""
    starts = [i for i, e in enumerate(ev.events) if e.get("event") == "run_start"]
    if not starts:
        return None
    start = ev.events[starts[-1]]
    after = ev.events[starts[-1]:]
    saved = [e["step"] for e in after if e.get("event") == "checkpoint_saved"
             and e.get("finite", True)] or [e["step"] for e in ev.events[:starts[-1]]
                                             if e.get("event") == "checkpoint_saved"]
    last_good = f"step {saved[-1]}" if saved else "none"
    if ev.owner != A.REDLINE and not saved:  # its loop saves its own checkpoints
        last_good = "its own (redline saves none for it)"
    max_steps = start.get("max_steps")
    for e in reversed(after):
        if e.get("event") == "failed":
            why = _WHY.get(str(e.get("error")), str(e.get("error")))
            return Finding("ended", "warning",
                           f"The run ended after step {e.get('step')} of {max_steps} with "
                           f"{why}; its last good checkpoint is {last_good}: fix the cause "
                           f"and {_go_on(ev, saved)}.", float(e.get("step", 0)))
        if e.get("event") == "interrupted":
            return Finding("ended", "info",
                           f"The run was stopped by {e.get('signal')} at step "
                           f"{e.get('step')} of {max_steps}; its last good checkpoint is "
                           f"{last_good}: {_go_on(ev, saved)}.", float(e.get("step", 0)))
    if any(e.get("event") == "run_end" for e in after):
        return None  # a framework's loop ended it (early stopping, its own limit): its call
    steps = series_of(ev.train, K.STEP)
    last = int(max(steps)) if steps else 0
    if max_steps and last < max_steps and not any(
            e.get("event") == "checkpoint_saved" and e.get("step") == max_steps for e in after):
        return Finding("ended", "warning",
                       f"The run's last record is step {last} of {max_steps} and it left no "
                       "word why (killed: by the kernel for memory, or kill -9); its last good "
                       f"checkpoint is {last_good}: {_go_on(ev, saved)}.",
                       float(last))
    return None


def nonfinite(ev: Evidence) -> Finding | None:
    counts = series_of(ev.train, K.NONFINITE_STEPS)
    total = int(sum(counts))
    if not total:
        return None
    firsts = [r[K.FIRST_NONFINITE] for r in ev.train if r.get(K.FIRST_NONFINITE) is not None]
    where = next((e.get("where") for e in ev.events if e.get("event") == "nonfinite"), None)
    skipped = int(sum(series_of(ev.train, K.SKIPPED_STEPS)))
    mode = lookup(ev.cfg, "train.on_nonfinite") or "skip"
    fate = (f"; {skipped} of their updates were skipped" if skipped
            else "" if ev.owner != A.REDLINE  # what its loop did with them is unknown
            else "; their updates were applied (train.on_nonfinite: warn)")
    at = f", first at step {firsts[0]}" if firsts else ""
    cause = f" ({where})" if where else ""
    fix = ("set train.on_nonfinite: skip so they do not poison the weights"
           if mode == "warn" and ev.owner == A.REDLINE
           else f"lower {ev.says(A.LR)}, or look at what went non-finite first")
    return Finding("nonfinite", "warning",
                   f"{total} steps had non-finite loss or gradients{at}{cause}{fate}: {fix}.",
                   float(total))


def memory_growth(ev: Evidence) -> Finding | None:
    for key, what in ((K.MEM_ALLOCATED, "Tensor memory"), (K.MEM_RSS, "Resident memory")):
        points = [(int(r[K.STEP]), float(r[key])) for r in ev.train
                  if isinstance(r.get(key), int | float) and isinstance(r.get(K.STEP), int)]
        if points:
            found = growth(points)
            if found is None:
                return None
            return Finding("memory-growth", "warning", found.sentence(what) + ".",
                           found.per_1000_steps)
    return None


RULES = [ended, nonfinite, memory_growth]
