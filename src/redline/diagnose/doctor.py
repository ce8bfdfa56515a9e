"""`redline doctor`: the environment check before a long job, rendered for a person.

Without a run directory, doctor prints the environment snapshot (environment.py) and
exits 1 on a blocker; with one, it diagnoses the run (`diagnose_run`: the rules of this
package's __init__), and a directory that is not there is bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redline.diagnose import Finding, diagnose
from redline.diagnose import render as render_findings
from redline.environment import Report
from redline.errors import UserError


class RunDirMissing(UserError):
    """`redline doctor RUN_DIR` named a directory that holds no run."""


@dataclass(frozen=True)
class Diagnosis:
    """A run directory's findings and the notes on evidence it lacked."""

    run_dir: str
    findings: list[Finding]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "notes": self.notes,
                "findings": [f.__dict__ for f in self.findings]}

    def render(self) -> str:
        return render_findings(self.findings, self.notes)


def diagnose_run(run_dir: str) -> Diagnosis:
    """Diagnose the run in `run_dir`; RunDirMissing when it is not there."""
    try:
        findings, notes = diagnose(run_dir)
    except FileNotFoundError as e:
        raise RunDirMissing(str(e)) from None
    return Diagnosis(run_dir, findings, notes)


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
