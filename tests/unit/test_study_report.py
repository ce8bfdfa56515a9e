"""The report's layout decisions, from plain data: a baseline drawn on its metric's plot,
sample images in one row in the task's order, single points on sane axes, readable log
ticks, and a report written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from redline.errors import StorageError
from redline.files import atomic_write_text
from redline.study.report import build, plots


def test_a_tasks_baseline_is_a_reference_line_on_its_metrics_plot(tmp_path: Path) -> None:
    keys = ["eval/psnr", "eval/psnr_bicubic", "eval/bleu4", "eval/baseline_bleu4",
            "eval/greedy_bleu4"]
    assert build.baseline_of("eval/psnr_bicubic", keys) == "eval/psnr"
    assert build.baseline_of("eval/baseline_bleu4", keys) == "eval/bleu4"
    assert build.baseline_of("eval/greedy_bleu4", keys) is None
    assert build.baseline_of("eval/psnr", keys) is None
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "eval/psnr": 20.0 + s, "eval/psnr_bicubic": 27.0}
            for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = [f["title"] for f in build._curves({"run": run})]
    assert "evaluation: eval/psnr" in titles
    assert "evaluation: eval/psnr_bicubic" not in titles  # no flat plot of its own


def test_each_samples_images_are_one_row_in_the_tasks_order(tmp_path: Path) -> None:
    def image(name: str, content: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(content)
        return str(path)

    shared = {"low-res": image("lr.png", b"lr"), "bicubic": image("bi.png", b"bi")}
    entries = {label: {"title": "crop 0", "images": {
        **shared, "generated": image(f"{label}.png", label.encode()),
        "high-res": image("hr.png", b"hr")}, "texts": {"note": "same"},
        "metrics": {"psnr": 20.0}} for label in ("fp32", "bf16-mixed")}
    row = build._sample_row(entries)
    cells = [c.get("name") or c.get("label") or c["kind"] for c in row["cells"]]
    assert cells == ["low-res", "bicubic", "fp32", "bf16-mixed", "high-res", "texts"]
    assert [i["name"] for i in row["cells"][2]["images"]] == ["generated"]


def test_a_single_point_is_drawn_on_sane_axes_and_log_ticks_read_as_numbers() -> None:
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    ax.plot([40], [0.3], marker="o")
    plots._sane_limits(ax, [40.0], [0.3])
    low, high = ax.get_xlim()
    assert low == 0 and high > 40
    assert ax.get_ylim()[0] < 0.3 < ax.get_ylim()[1]
    plots._log_axis(ax, 0.6, 2.4)
    fig.canvas.draw()
    labels = [t.get_text() for t in (*ax.get_yticklabels(), *ax.get_yticklabels(minor=True))
              if t.get_text()]
    assert labels and not any("times" in t or "^" in t for t in labels), labels
    plt.close(fig)
    assert plots.lines({"fp32": [(40, 0.3)]}, "one point").startswith("data:image/png")


def test_the_report_is_written_whole_or_not_at_all(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.html"
    atomic_write_text(out, "first")
    assert out.read_text() == "first"

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(StorageError):
        atomic_write_text(out, "second")
    assert out.read_text() == "first"  # the previous report, not a truncated one
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left
