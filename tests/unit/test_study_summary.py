"""A study's speed verdicts, its changed-nothing flags and its recommendation, from injected
timing rounds and run directories (no timing measured here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redline.config import RunConfig
from redline.study import verdicts
from redline.study.matrix import adapt_log_every, set_explicitly
from redline.study.summarize import summarize


def _run(root: Path, name: str, accuracy: float, loss: float, precision: str,
         fp8: list[bool] | None = None) -> None:
    run = root / name
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": loss + s * 1e-3, "samples_per_s": 100.0} for s in (10, 20)]
    rows.append({"step": 20, "eval/accuracy": accuracy})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = [{"event": "run_start", "precision": precision}]
    if fp8 is not None:
        events.append({"event": "fp8_layers", "layers": [
            {"name": f"l{i}", "converted": c} for i, c in enumerate(fp8)]})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def _study(root: Path, others: dict[str, tuple[float, float, list[bool] | None]],
           rates: dict[str, list[float]]) -> dict:
    settings = [("fp32", 0, True), ("fp32", 1, True), *((p, 0, False) for p in others)]
    plan = {"task": "t", "settings": [
        {"precision": p, "vary": [], "seed": s, "reference": r, "run": f"{p}-s{s}", "label": p}
        for p, s, r in settings]}
    _run(root, "fp32-s0", 0.90, 0.30, "fp32")
    _run(root, "fp32-s1", 0.91, 0.31, "fp32")
    for p, (acc, loss, fp8) in others.items():
        _run(root, f"{p}-s0", acc, loss, p, fp8)
    outcomes = {f"{p}-s{s}": {"status": "finished"} for p, s, _ in settings}
    return summarize(plan, outcomes, root, timing={
        "rounds": 5, "settings": {k: {"rates": v} for k, v in rates.items()}})


def test_a_speed_up_within_the_timing_noise_is_said_so_and_not_recommended(
        tmp_path: Path) -> None:
    # observed: bf16-mixed recommended at 1.43x on a loaded machine, 0.45x when re-measured
    summary = _study(tmp_path, {"bf16-mixed": (0.905, 0.305, None)}, {
        "fp32": [100, 60, 140, 90, 110], "bf16-mixed": [143, 80, 150, 120, 160]})
    bf16 = next(e for e in summary["settings"] if e["setting"] == "bf16-mixed")
    assert bf16["metrics"]["accuracy"]["verdict"] == "within noise"
    assert bf16["speed"]["kind"] == "within noise" and "within the timing noise" in \
        bf16["speed"]["text"]
    assert bf16["samples_per_s"] == 143 and bf16["samples_per_s_source"] == \
        "interleaved rounds"
    rec = summary["recommendation"]
    assert rec["setting"] == "fp32" and rec["change"] is False
    assert "bf16-mixed: 1.43x, within the timing noise" in rec["why"]


def test_a_speed_up_beyond_noise_with_quality_within_noise_is_recommended(
        tmp_path: Path) -> None:
    summary = _study(tmp_path, {"bf16-mixed": (0.905, 0.305, None),
                                "fp16-mixed": (0.70, 0.9, None)}, {
        "fp32": [100, 98, 102, 101, 99], "bf16-mixed": [180, 178, 183, 181, 179],
        "fp16-mixed": [250, 251, 249, 252, 250]})  # faster still, but worse beyond noise
    rec = summary["recommendation"]
    assert rec["setting"] == "bf16-mixed" and rec["change"] is True
    assert rec["speedup"] == pytest.approx(1.8)
    assert rec["excluded"]["fp16-mixed"] == "accuracy worse"


def test_fp8_that_converted_no_layer_is_flagged_and_never_recommended(tmp_path: Path) -> None:
    # observed: fp8-emulated with no layer qualifying was listed at 1.71x and "within noise"
    summary = _study(tmp_path, {"fp8-emulated": (0.92, 0.29, [False, False]),
                                "fp8": (0.92, 0.29, [False])}, {
        "fp32": [100, 98, 102, 101, 99], "fp8-emulated": [171, 170, 172, 171, 170],
        "fp8": [300, 301, 299, 300, 300]})
    by = {e["setting"]: e for e in summary["settings"]}
    for name in ("fp8-emulated", "fp8"):
        assert by[name]["fp8_converted"] == 0
        assert by[name]["changed_nothing"].startswith("changed nothing: no layer qualified")
    assert "0 of 2 converted" in by["fp8-emulated"]["changed_nothing"]
    rec = summary["recommendation"]
    assert rec["setting"] == "fp32" and rec["change"] is False
    assert "fp8: changed nothing" in rec["why"]
    assert rec["excluded"] == {"fp8-emulated": "changed nothing", "fp8": "changed nothing"}


def test_fp8_with_converted_layers_is_not_flagged(tmp_path: Path) -> None:
    summary = _study(tmp_path, {"fp8": (0.905, 0.3, [False, True])}, {
        "fp32": [100, 98, 102], "fp8": [200, 201, 199]})
    fp8 = next(e for e in summary["settings"] if e["setting"] == "fp8")
    assert fp8["fp8_converted"] == 1 and fp8["changed_nothing"] is None
    assert summary["recommendation"]["setting"] == "fp8"


def test_a_precision_bit_identical_to_the_references_same_seed_run_changed_nothing(
        tmp_path: Path) -> None:
    # the device ran "bf16-mixed" as fp32: every loss and metric equals fp32's seed 0
    summary = _study(tmp_path, {"bf16-mixed": (0.90, 0.30, None)}, {
        "fp32": [100, 98, 102], "bf16-mixed": [200, 201, 199]})
    bf16 = next(e for e in summary["settings"] if e["setting"] == "bf16-mixed")
    assert "bit-identical to fp32's seed-0 run" in bf16["changed_nothing"]
    assert summary["recommendation"]["change"] is False


def test_speed_is_unjudged_without_interleaved_rounds() -> None:
    assert verdicts.speed_verdict([], [])["kind"] == verdicts.UNJUDGED
    assert verdicts.speed_verdict([150.0], [100.0])["kind"] == verdicts.UNJUDGED
    slower = verdicts.speed_verdict([50, 51, 49], [100, 101, 99])
    assert slower["kind"] == verdicts.SLOWER and slower["speedup"] == pytest.approx(0.5)


def test_short_runs_log_at_least_twenty_points_unless_log_every_was_set(
        tmp_path: Path) -> None:
    config = RunConfig().updated({"train.steps": 40})
    adapted, notes = adapt_log_every(config)
    assert adapted.telemetry.log_every == 2 and "log_every 50 -> 2" in notes[0]
    long = RunConfig().updated({"train.steps": 5000})
    assert adapt_log_every(long) == (long, [])
    assert set_explicitly(None, ["telemetry.log_every=50"], "telemetry.log_every")
    assert not set_explicitly(None, ["train.steps=40"], "telemetry.log_every")
    (tmp_path / "c.yaml").write_text("telemetry:\n  log_every: 50\n")
    assert set_explicitly(tmp_path / "c.yaml", [], "telemetry.log_every")


def test_a_precision_whose_layers_ran_in_float32_changed_nothing(tmp_path: Path) -> None:
    summary = _study(tmp_path, {"bf16-mixed": (0.905, 0.305, None)}, {
        "fp32": [100, 98, 102], "bf16-mixed": [200, 201, 199]})
    assert summary["recommendation"]["setting"] == "bf16-mixed"  # it did change something
    timing = {"rounds": 3, "settings": {
        "fp32": {"rates": [100, 98, 102]},
        "bf16-mixed": {"rates": [200, 201, 199], "compute_dtype": "bfloat16",
                       "ran": {"float32": 3}}}}  # what its layers produced when timed
    plan = json.loads(json.dumps({"task": "t", "settings": [
        {"precision": p, "vary": [], "seed": s, "reference": p == "fp32", "run": f"{p}-s{s}",
         "label": p} for p, s in (("fp32", 0), ("fp32", 1), ("bf16-mixed", 0))]}))
    outcomes = {s["run"]: {"status": "finished"} for s in plan["settings"]}
    again = summarize(plan, outcomes, tmp_path, timing=timing)
    bf16 = next(e for e in again["settings"] if e["setting"] == "bf16-mixed")
    assert "not bfloat16 (the device ran bf16-mixed as fp32)" in bf16["changed_nothing"]
    assert again["recommendation"]["change"] is False


@pytest.mark.slow  # builds two jobs: a few seconds on a loaded machine
def test_what_a_precisions_layers_ran_in_is_recorded_from_one_forward() -> None:
    from redline.job.build import build_job
    from redline.study.timing import compute_dtypes
    from tests.tasks.studycases import Digits

    base = RunConfig().updated({"device": "cpu", "memory.oom_guard": False})
    bf16 = compute_dtypes(build_job(base.updated({"precision.name": "bf16-mixed"}),
                                    Digits(n=160), None))
    assert bf16["compute_dtype"] == "bfloat16" and bf16["ran"].get("bfloat16", 0) >= 3
    assert compute_dtypes(build_job(base, Digits(n=160), None)) == {}  # fp32: nothing to check
