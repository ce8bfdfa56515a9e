"""`redline doctor RUN_DIR`: where a finished (or running) run's step time went, and how it
ended.

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

from pathlib import Path

from redline.diagnose import health, ranks, speed
from redline.diagnose.evidence import Evidence, Finding, Rule, load_evidence

__all__ = ["RULES", "Evidence", "Finding", "diagnose", "load_evidence", "render"]

RULES: list[Rule] = [*health.RULES, *speed.RULES, *ranks.RULES]


def diagnose(run_dir: str | Path) -> tuple[list[Finding], list[str]]:
    """Findings about how the run went and where its step time went, and notes on
    missing evidence."""
    ev = load_evidence(run_dir)
    found = [f for rule in RULES if (f := rule(ev)) is not None]
    overhead = speed.telemetry_overhead(ev)
    verdict = speed.no_bottleneck(ev, [*found, *([overhead] if overhead else [])])
    return [*found, *([verdict] if verdict else []), *([overhead] if overhead else [])], ev.notes


def render(findings: list[Finding], notes: list[str]) -> str:
    """Human text: one finding per line, warnings marked, then the notes."""
    lines = [f"{f.severity:<8} {f.kind:<19} {f.message}" for f in findings]
    lines += [f"note     {n}" for n in notes]
    return "\n".join(lines) if lines else "no findings"
