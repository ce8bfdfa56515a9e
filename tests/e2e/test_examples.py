"""The built-in example, run exactly as the README and the issue show it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each


TINY = ["--set", "task_args.size=16", "--set", "task_args.channels=8",
        "--set", "task_args.num_train_crops=64", "--set", "task_args.num_eval_crops=4",
        "--set", "task_args.sample_steps=4", "--set", "train.batch_size=8"]


def test_sr3_tiny_writes_a_complete_run(tmp_path: Path) -> None:
    """The built-in example as the README runs it, at tiny task arguments (seconds)."""
    out = run_cli(["train", "sr3-tiny", "--steps", "12", "--json",
                   "--set", "telemetry.log_every=4", *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = tmp_path / result["run_dir"]
    assert result["run_dir"].startswith("runs/sr3-tiny-") and result["steps"] == 12
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "events.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step-00000012.pt").is_file()
    ev = result["eval"]
    for key in ("loss", "psnr", "ssim", "psnr_bicubic", "ssim_bicubic"):
        assert math.isfinite(ev[key]), key
    assert ev["psnr_bicubic"] > 15  # the baseline is a real photograph, not noise
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["micro_batch"] == 8 and r["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_sr3_tiny_learns(tmp_path: Path) -> None:
    """Quality, not plumbing: 120 steps of the default-sized model lower the loss."""
    out = run_cli(["train", "sr3-tiny", "--steps", "120", "--run-dir", "r", "--set",
                   "telemetry.log_every=20", "--set", "train.eval_every=0", "--set",
                   "train.lr=1e-3", "--set", "task_args.num_eval_crops=4",
                   "--set", "task_args.sample_steps=10"], tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr
    losses = [r["loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "fp16-mixed"])
def test_precisions_run_as_asked_and_are_recorded(tmp_path: Path, precision: str) -> None:
    out = run_cli(["train", TOY, "--steps", "20", "--precision", precision, "--json",
                   "--run-dir", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["precision"] == precision and math.isfinite(result["final_loss"])
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["run"]["precision"]["name"] == precision
    dtype = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "fp16-mixed": "float16"}
    assert env["run"]["precision"]["compute_dtype"] == dtype[precision]


def test_sst_tiny_after_its_default_training_beats_persistence_and_climatology(
        tmp_path: Path) -> None:
    """`redline train sst-tiny` as the README runs it: 1000 steps, ~20 s on this CPU."""
    pytest.importorskip("xarray")
    out = run_cli(["train", "sst-tiny", "--json", "--no-report"], tmp_path)
    assert out.returncode == 0, out.stderr
    ev = json.loads(out.stdout.strip().splitlines()[-1])["eval"]
    assert ev["rmse"] < ev["rmse_persistence"] < ev["rmse_climatology"], ev
    assert ev["acc"] > 0.6 and ev["acc_climatology"] == pytest.approx(0.0, abs=1e-6)


def test_reportgen_tiny_beats_the_most_common_report_in_a_few_hundred_steps(
        tmp_path: Path) -> None:
    """300 steps (~1 min on this CPU): BLEU-4 and clinical F1 above every case given the
    training set's most common report, and samples with both reports."""
    pytest.importorskip("pycocoevalcap")
    out = run_cli(["train", "reportgen-tiny", "--steps", "300", "--batch-size", "32",
                   "--set", "train.lr=1e-3", "--set", "task_args.eval_cases=100",
                   "--set", "train.eval_every=0", "--set", "train.samples=2",
                   "--run-dir", "run", "--json", "--no-report"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "generated (examples/cxr.py), not real patient data" in out.stderr
    ev = json.loads(out.stdout.strip().splitlines()[-1])["eval"]
    assert {"bleu1", "bleu4", "rouge_l", "cider", "ce_precision", "ce_recall"} <= set(ev)
    assert ev["bleu4"] > ev["baseline_bleu4"] + 0.05, ev
    assert ev["ce_f1"] > ev["baseline_ce_f1"] + 0.3, ev
    samples = json.loads((tmp_path / "run" / "samples" / "samples.json").read_text())
    assert len(samples) == 2 and all(set(s["texts"]) == {"reference", "generated"}
                                     for s in samples)
    # each generated report's own BLEU-4 beside it, as a precision study's report shows
    assert all(0.0 <= s["metrics"]["bleu4"] <= 1.0 and "ce_f1" in s["metrics"]
               for s in samples)
