"""A study's verdicts beyond quality: speed against timing noise, a setting that changed
nothing, and the recommendation that needs both.

    speed       a setting's interleaved rounds (timing.py) against the reference's: the
                ratio of their medians, judged against the timing noise, the larger of
                judge.TIMING_TOLERANCE and either side's spread (range / median):
                    faster   ratio > 1 + noise     slower   ratio < 1 - noise
                    within noise otherwise: no measured speed-up
                With fewer than two rounds on either side, or no rounds at all, the speed
                is "unjudged": a run's own wall clock is not a comparison.
    changed     a precision that changed nothing: fp8 / fp8-emulated with zero converted
      nothing   layers (the run's fp8_layers record); a narrower precision whose Linear and
                convolution layers all produced float32 when it was timed (timing.py's
                record of what ran: the device ran it as fp32); or any setting whose
                losses and metrics are bit-identical to the reference's run of the same
                seed (the device ran it as the reference).
    recommend   the fastest setting that finished, is not an emulation, changed
                something, kept every metric within the reference's noise or better, and
                is faster beyond the timing noise. Otherwise none: keep the reference, and
                each other setting's reason is given.

Every function takes plain data (rates, figures), so tests inject what a machine measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from redline.judge import TIMING_TOLERANCE, relative_range

FASTER, SLOWER, WITHIN, UNJUDGED = "faster", "slower", "within noise", "unjudged"
FP8_NAMES = ("fp8", "fp8-emulated")


def speed_verdict(rates: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """A setting's rounds of samples/s against the reference's (module docstring):
    {"kind", "speedup", "noise", "text"}."""
    if not rates or not reference:
        return {"kind": UNJUDGED, "speedup": None, "noise": None,
                "text": "not timed in interleaved rounds: no speed claim"}
    speedup = statistics.median(rates) / statistics.median(reference)
    if len(rates) < 2 or len(reference) < 2:
        return {"kind": UNJUDGED, "speedup": speedup, "noise": None,
                "text": f"{speedup:.2f}x from one round: no timing noise, no speed claim"}
    noise = max(TIMING_TOLERANCE, relative_range(rates), relative_range(reference))
    band = f"timing noise ±{noise:.0%} over {min(len(rates), len(reference))} rounds"
    if speedup > 1 + noise:
        return {"kind": FASTER, "speedup": speedup, "noise": noise,
                "text": f"{speedup:.2f}x, faster beyond the {band}"}
    if speedup < 1 - noise:
        return {"kind": SLOWER, "speedup": speedup, "noise": noise,
                "text": f"{speedup:.2f}x, slower beyond the {band}"}
    return {"kind": WITHIN, "speedup": speedup, "noise": noise,
            "text": f"{speedup:.2f}x, within the {band}: no measured speed-up"}


def changed_nothing(precision: str, figures: Sequence[Mapping[str, Any]],
                    reference_figures: Mapping[int, Mapping[str, Any]],
                    reference_precision: str,
                    timed: Mapping[str, Any] | None = None) -> str | None:
    """Why the setting changed nothing, or None (module docstring). `figures`: the
    setting's runs (run_figures, with "seed"); `reference_figures`: the reference's by seed;
    `timed`: the setting's timing record, with what its layers ran in."""
    if precision in FP8_NAMES:
        counts = [f.get("fp8_converted") for f in figures]
        if counts and all(c == 0 for c in counts):
            total = next((f.get("fp8_layers") for f in figures if f.get("fp8_layers")), 0)
            return (f"changed nothing: no layer qualified for fp8 (0 of {total} converted; "
                    "see the fp8 layer table), so it trained as fp32")
    ran, wanted = (timed or {}).get("ran"), (timed or {}).get("compute_dtype")
    if ran and wanted and wanted not in ran and set(ran) == {"float32"}:
        return (f"changed nothing: every Linear and convolution output was float32, not "
                f"{wanted} (the device ran {precision} as fp32)")
    for f in figures:
        ref = reference_figures.get(f.get("seed"))  # type: ignore[arg-type]
        if ref is not None and f.get("trace") and f.get("trace") == ref.get("trace"):
            return (f"changed nothing: its losses and metrics are bit-identical to "
                    f"{reference_precision}'s seed-{f.get('seed')} run (the device ran it "
                    f"as {reference_precision})")
    return None


def recommend(entries: Sequence[Mapping[str, Any]], reference: Mapping[str, Any]
              ) -> dict[str, Any]:
    """The recommendation (module docstring): {"setting", "speedup", "change", "why",
    "excluded"}; `change` False keeps the reference; `excluded`: each other setting that
    could not be recommended, with the reason."""
    chosen, excluded = [], {}
    for e in entries:
        if e is reference:
            continue
        why = exclusion(e)
        if why is None:
            chosen.append(e)
        else:
            excluded[e["setting"]] = why
    reasons = [f"{name}: {why}" for name, why in excluded.items()]
    if chosen:
        best = max(chosen, key=lambda e: e["speed"]["speedup"])
        why = ("the fastest setting faster than the reference beyond the timing noise, with "
               "every metric within the reference's run-to-run noise or better")
        return {"setting": best["setting"], "speedup": best["speed"]["speedup"],
                "change": True, "why": why, "excluded": excluded}
    why = f"nothing beat {reference['setting']} on both quality and speed"
    if reasons:
        why += " (" + "; ".join(reasons) + ")"
    if reference.get("seeds", 0) < 2:
        why += "; one reference seed: no noise floor, quality differences are unjudged"
    return {"setting": reference["setting"], "speedup": 1.0, "change": False, "why": why,
            "excluded": excluded}


def exclusion(entry: Mapping[str, Any]) -> str | None:
    """Why `entry` cannot be recommended, or None when it can."""
    if entry["status"] != "finished":
        return entry["status"]
    if entry.get("changed_nothing"):
        return entry["changed_nothing"].split(":", 1)[0]
    if entry.get("emulated"):
        return "an emulation: the format's numerics, not its speed"
    bad = [m for m, item in entry.get("metrics", {}).items()
           if item["verdict"] not in ("within noise", "better")]
    if bad:
        return ", ".join(f"{m} {entry['metrics'][m]['verdict']}" for m in bad)
    speed = entry.get("speed") or {}
    if speed.get("kind") != FASTER:
        return speed.get("text", "speed unjudged")
    return None
