"""`redline doctor`: the environment check before a long job, rendered for a person.

Without a run directory, doctor prints the environment snapshot (environment.py) and
exits 1 on a blocker; with one, it diagnoses the run (`diagnose_run`: the rules of this
package's __init__), and a directory that is not there is bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redline.diagnose import Finding, diagnose
from redline.diagnose import render as render_findings
from redline.environment import Report
from redline.errors import UserError
from redline.memory.breakdown import MEMORY_FILE, Breakdown


class RunDirMissing(UserError):
    """`redline doctor RUN_DIR` named a directory that holds no run."""


@dataclass(frozen=True)
class Diagnosis:
    """A run directory's findings and the notes on evidence it lacked."""

    run_dir: str
    findings: list[Finding]
    notes: list[str]
    memory: dict[str, Any] | None = None  # RUN_DIR/memory.json, where the run wrote one

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "notes": self.notes,
                "findings": [f.__dict__ for f in self.findings],
                **({"memory": self.memory} if self.memory is not None else {})}

    def render(self) -> str:
        text = render_findings(self.findings, self.notes)
        if self.memory is None:
            return text
        m = self.memory
        breakdown = Breakdown.from_dict(m["breakdown"]).render(m.get("budget"))
        fit = f"; {m['fit']}" if m.get("fit") else ""
        return f"{text}\nmemory   {m.get('error', '')}{fit} ({MEMORY_FILE}):\n{breakdown}"


def diagnose_run(run_dir: str) -> Diagnosis:
    """Diagnose the run in `run_dir`; RunDirMissing when it is not there."""
    try:
        findings, notes = diagnose(run_dir)
    except FileNotFoundError as e:
        raise RunDirMissing(str(e)) from None
    return Diagnosis(run_dir, findings, notes, _memory(Path(run_dir), notes))


def _memory(run_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    """The memory breakdown a run wrote when it ran out of memory at one sample (run/oom.py);
    None where it has none (evidence-conditioned: no file, nothing shown)."""
    path = run_dir / MEMORY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        Breakdown.from_dict(data["breakdown"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.append(f"{MEMORY_FILE} could not be read ({type(e).__name__})")
        return None
    return data  # type: ignore[no-any-return]


def render(report: Report) -> str:
    d = report.info["device"]
    lines = [
        f"redline {report.info['redline']}  python {report.info['python']}  "
        f"torch {report.info['torch']}  cuda {report.info['cuda'] or '-'}",
        f"device     {d['kind']}: {d['name']}"
        + (f", {d['memory_total'] / 2**30:.1f} GiB" if d["memory_total"] else ""),
        "precisions " + ", ".join(
            f"{n} {'ok' if r == 'ok' else 'no'}" for n, r in report.info["precisions"].items()),
        "extras     " + ", ".join(
            f"{n} {'yes' if ok else 'no'}" for n, ok in report.info["extras"].items()),
        "torchrun   " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in
                                  report.info.get("distributed", {}).items()
                                  if n != "available"),
    ]
    lines += [f"warning    {w}" for w in report.warnings]
    lines += [f"BLOCKER    {b}" for b in report.blockers]
    lines.append("ok: training can run here" if report.ok else "not ok: fix the blockers above")
    return "\n".join(lines)
