"""`redline doctor`: the environment check before a long job, rendered for a person.

Without a run directory, doctor prints the environment snapshot (environment.py) and
exits 1 on a blocker; with one, it diagnoses the run (diagnose.py).
"""

from __future__ import annotations

from redline.environment import Report


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
