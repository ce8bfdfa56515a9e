"""report.html from a run or a study directory: the context, the plots, the template.

A study directory (it has study.json) gives the summary table with verdicts, overlaid
curves of every run, each setting's per-layer statistics, the fp8 layer table and the
samples side by side; a run directory gives its own figures, curves, statistics, samples
and diagnosis. Everything is embedded (plots and images as data URIs, styles inline), so
the file opens anywhere with no network.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from redline.errors import UserError
from redline.files import atomic_write_text
from redline.inspector import read_rows
from redline.run.samples import read_samples
from redline.study.report import plots
from redline.study.summarize import PLAN, read_outcomes, run_figures, summarize
from redline.telemetry import schema as K
from redline.telemetry.jsonl import read_jsonl

REPORT = "report.html"


class ReportError(UserError):
    """The directory is neither a run nor a study; the message says what it lacks."""


def build_report(directory: str | Path, summary: dict[str, Any] | None = None) -> Path:
    """Write DIRECTORY/report.html and return its path (module docstring)."""
    root = Path(directory)
    if (root / PLAN).is_file():
        context = _study_context(root, summary)
    elif (root / "metrics.jsonl").is_file():
        context = _run_context(root)
    else:
        raise ReportError(f"{str(root)!r} is neither a run directory (no metrics.jsonl) nor a "
                          f"study directory (no {PLAN}); give one that redline train or "
                          "redline study wrote")
    html = _render(context)
    out = root / REPORT
    atomic_write_text(out, html, "report")  # a full disk leaves the previous report
    return out


def _render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("redline.study", "report"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["size"] = _size
    return env.get_template("template.html.j2").render(**context)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # 15469.7 as 15470, not as 1.547e+04
        return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return str(value)


def _size(value: Any) -> str:
    if not value:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


# ---- what both kinds show ------------------------------------------------------------------


def _curves(runs: dict[str, Path]) -> list[dict[str, str]]:
    """Overlaid training and evaluation curves of every run, by label."""
    rows = {label: read_jsonl(path / "metrics.jsonl") for label, path in runs.items()
            if (path / "metrics.jsonl").is_file()}
    figures = []
    for key, title, log in ((K.LOSS, "training loss", True), (K.GRAD_NORM, "gradient norm",
                                                              True),
                            (K.SAMPLES_PER_S, "throughput (samples/s)", False)):
        uri = plots.lines({label: [(r[K.STEP], r.get(key)) for r in rs if key in r]
                           for label, rs in rows.items()}, title, log_y=log)
        if uri:
            figures.append({"title": title, "uri": uri})
    metrics = sorted({k for rs in rows.values() for r in rs for k in r
                      if K.is_eval(k) and k != K.EVAL_TIME})
    baselines = {b: m for b in metrics if (m := baseline_of(b, metrics))}
    for key in metrics:
        if key in baselines:  # drawn on its metric's plot instead
            continue
        refs = {f"baseline: {b.removeprefix(K.EVAL_PREFIX)}": [
                    (r[K.STEP], r.get(b)) for r in next(iter(rows.values())) if b in r]
                for b, m in baselines.items() if m == key}
        uri = plots.lines({label: [(r[K.STEP], r.get(key)) for r in rs if key in r]
                           for label, rs in rows.items()}, f"evaluation: {key}",
                          references=refs)
        if uri:
            figures.append({"title": f"evaluation: {key}", "uri": uri})
    return figures


BASELINE_WORDS = ("baseline", "bicubic", "bilinear", "nearest", "identity", "trivial")


def baseline_of(key: str, keys: list[str]) -> str | None:
    """The metric `key` is a task's baseline of (eval/psnr_bicubic -> eval/psnr,
    eval/baseline_bleu4 -> eval/bleu4), or None."""
    name = key.removeprefix(K.EVAL_PREFIX)
    for other in keys:
        base = other.removeprefix(K.EVAL_PREFIX)
        if other == key or not base:
            continue
        if name in (f"baseline_{base}", f"{base}_baseline") or (
                name.startswith(base + "_") and name[len(base) + 1:] in BASELINE_WORDS):
            return other
    return None


def _statistics(label: str, run_dir: Path) -> list[dict[str, str]]:
    rows = read_rows(run_dir)
    figures = []
    for kind, value in (("grad", "norm"), ("activation", "absmax")):
        title = f"{label}: {kind} {value} by layer"
        uri = plots.heatmap(rows, value, title, kind)
        if uri:
            figures.append({"title": title, "uri": uri})
    series = read_rows(run_dir, "series")
    for name in dict.fromkeys(r["name"] for r in series):
        steps = sorted({r["step"] for r in series if r["name"] == name})
        shown = steps[:: max(1, len(steps) // 4)][-4:] + ([steps[-1]] if steps else [])
        uri = plots.lines({f"step {s}": [(r["index"], r["value"]) for r in series
                                         if r["name"] == name and r["step"] == s]
                           for s in dict.fromkeys(shown)}, f"{label}: {name}", xlabel="index")
        if uri:
            figures.append({"title": f"{label}: {name}", "uri": uri})
    return figures


def _fp8_table(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    plan = [e for e in read_jsonl(path) if e.get("event") == "fp8_layers"]
    return plan[-1]["layers"] if plan else []


def _environment(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "environment.json"
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    device = env.get("device", {})
    return {"device": device.get("name"), "torch": env.get("torch"),
            "redline": env.get("redline")}


def _samples(by_label: dict[str, Path]) -> list[dict[str, Any]]:
    """For each fixed input, one row of cells in the task's image order: each image every
    run shares (the input, a baseline, the reference) once, and every run's own output
    where the task puts its output (sr3: low-res, bicubic, each run's output, high-res),
    with its texts and metrics; texts every run shares last."""
    per_run = {label: read_samples(path) for label, path in by_label.items()}
    per_run = {label: s for label, s in per_run.items() if s}
    if not per_run:
        return []
    count = min(len(s) for s in per_run.values())
    return [_sample_row({label: s[i] for label, s in per_run.items()})
            for i in range(count)]


def _sample_row(entries: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(entries.values()))
    shared = {name for name, path in first["images"].items()
              if all(e["images"].get(name) is not None and
                     Path(e["images"][name]).read_bytes() == Path(path).read_bytes()
                     for e in entries.values())}
    shared_texts = [name for name, text in first["texts"].items()
                    if all(e["texts"].get(name) == text for e in entries.values())]
    outputs = [{"kind": "output", "label": label,
                "images": [{"name": n, "uri": plots.image_uri(p)}
                           for n, p in e["images"].items() if n not in shared],
                "texts": [{"name": n, "text": t} for n, t in e["texts"].items()
                          if n not in shared_texts],
                "metrics": e.get("metrics", {})} for label, e in entries.items()]
    cells: list[dict[str, Any]] = []
    for name, path in first["images"].items():
        if name in shared:
            cells.append({"kind": "image", "name": name, "uri": plots.image_uri(path)})
        elif outputs:  # the runs' outputs, once, where the first of them stands
            cells += outputs
            outputs = []
    cells += outputs  # a task whose every image is shared: the outputs after them
    if shared_texts:
        cells.append({"kind": "texts", "texts": [{"name": n, "text": first["texts"][n]}
                                                 for n in shared_texts]})
    return {"title": first["title"], "cells": cells}


# ---- a study -------------------------------------------------------------------------------


def _study_context(root: Path, summary: dict[str, Any] | None) -> dict[str, Any]:
    plan = json.loads((root / PLAN).read_text())
    if summary is None:
        summary = summarize(plan, read_outcomes(root), root)
    first_seed: dict[str, Path] = {}  # one run per setting for statistics and samples
    all_runs: dict[str, Path] = {}
    for s in plan["settings"]:
        label, path = s["label"], root / s["run"]
        if (path / "metrics.jsonl").is_file():
            first_seed.setdefault(label, path)
            all_runs[f"{label} (seed {s['seed']})"] = path
    metrics = list(next((e["metrics"] for e in summary["settings"] if e["reference"]), {}))
    fp8 = next(((label, t) for label, p in first_seed.items() if (t := _fp8_table(p))),
               (None, []))
    return {"kind": "study", "title": f"redline study: {plan.get('task')}",
            "generated": datetime.now().strftime("%Y-%m-%d %H:%M"), "directory": str(root),
            "steps": plan["base"]["train"]["steps"], "summary": summary,
            "metric_names": metrics,
            "environment": _environment(next(iter(first_seed.values()), root)),
            "curves": _curves(all_runs),
            "statistics": [f for label, p in first_seed.items() for f in _statistics(label, p)],
            "fp8_label": fp8[0], "fp8_layers": fp8[1], "samples": _samples(first_seed)}


# ---- a run ---------------------------------------------------------------------------------


def _run_context(root: Path) -> dict[str, Any]:
    from redline import diagnose

    findings, notes = diagnose.diagnose(root)
    label = root.name
    return {"kind": "run", "title": f"redline run: {label}",
            "generated": datetime.now().strftime("%Y-%m-%d %H:%M"), "directory": str(root),
            "figures": run_figures(root), "environment": _environment(root),
            "curves": _curves({label: root}), "statistics": _statistics(label, root),
            "fp8_label": label, "fp8_layers": _fp8_table(root),
            "samples": _samples({label: root}),
            "findings": [f.__dict__ for f in findings], "notes": notes}
