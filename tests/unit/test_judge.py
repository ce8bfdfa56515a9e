"""Verdicts against the reference's noise, and a study summary read from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redline import judge
from redline.study.summarize import summarize


def test_verdicts_are_judged_against_two_standard_deviations_of_the_reference() -> None:
    band = judge.Band.of([20.0, 21.0, 22.0])  # mean 21, std 1: band ±2
    assert band.half_width == pytest.approx(2.0)
    assert judge.judge(22.5, band, higher_better=True).kind == judge.WITHIN
    worse = judge.judge(18.0, band, higher_better=True)
    assert worse.kind == judge.WORSE and "worse by 3" in worse.text and "±2" in worse.text
    assert judge.judge(18.0, band, higher_better=False).kind == judge.BETTER
    assert judge.judge(float("nan"), band, True).kind == judge.DIVERGED
    assert judge.judge(21.0, judge.Band.of([21.0]), True).kind == judge.NO_FLOOR
    assert "identical" in judge.judge(5.0, judge.Band.of([5.0, 5.0]), True).text


def test_a_metrics_direction_comes_from_the_task_or_its_name() -> None:
    assert not judge.higher_is_better("eval/rmse") and not judge.higher_is_better("loss")
    assert judge.higher_is_better("psnr") and judge.higher_is_better("acc")
    assert judge.higher_is_better("fid", {"fid": "max"})


def _run(root: Path, name: str, psnr: float | str, loss: float | str, speed: float) -> None:
    run = root / name
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": loss, "samples_per_s": speed, "step_time_s": 1 / speed}
            for s in (10, 20, 30)]
    rows.append({"step": 30, "eval/psnr": psnr, "eval/loss": loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_summary_recommends_the_fastest_setting_within_noise(tmp_path: Path) -> None:
    settings = [("fp32", 0, True), ("fp32", 1, True), ("bf16-mixed", 0, False),
                ("fp16-mixed", 0, False), ("fp8-emulated", 0, False), ("fp8", 0, False)]
    plan = {"task": "t", "settings": [
        {"precision": p, "vary": [], "seed": s, "reference": r, "run": f"{p}-s{s}", "label": p}
        for p, s, r in settings]}
    _run(tmp_path, "fp32-s0", 20.0, 0.10, 100)
    _run(tmp_path, "fp32-s1", 21.0, 0.12, 100)
    _run(tmp_path, "bf16-mixed-s0", 20.6, 0.11, 180)
    _run(tmp_path, "fp16-mixed-s0", "NaN", "NaN", 150)  # metrics.jsonl writes NaN as a string
    _run(tmp_path, "fp8-emulated-s0", 20.5, 0.11, 400)  # fastest, but an emulation
    with open(tmp_path / "fp8-emulated-s0" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "loss": 0.11, "precision/emulated": 1}) + "\n")
    outcomes = {f"{p}-s{s}": {"status": "finished"} for p, s, _ in settings}
    outcomes["fp16-mixed-s0"] = {"status": "diverged", "reason": "non-finite steps"}
    outcomes["fp8-s0"] = {"status": "refused", "reason": "needs sm_89"}
    rounds = {"fp32": [100, 99, 101], "bf16-mixed": [180, 178, 181],
              "fp8-emulated": [400, 399, 402]}  # interleaved rounds of samples/s, injected
    summary = summarize(plan, outcomes, tmp_path, timing={
        "rounds": 3, "settings": {k: {"rates": v} for k, v in rounds.items()}})
    by = {e["setting"]: e for e in summary["settings"]}
    assert by["fp32"]["seeds"] == 2 and by["fp32"]["metrics"]["psnr"]["verdict"] == "reference"
    assert by["bf16-mixed"]["metrics"]["psnr"]["verdict"] == "within noise"
    assert by["bf16-mixed"]["speedup"] == pytest.approx(1.8)
    assert by["fp16-mixed"]["metrics"]["psnr"]["verdict"] == "diverged"
    assert by["fp8"]["status"] == "refused" and by["fp8"]["reason"] == "needs sm_89"
    assert by["fp8-emulated"]["emulated"]
    assert summary["recommendation"]["setting"] == "bf16-mixed"
