"""The built-in example, run exactly as the README and the issue show it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli


def test_sr3_tiny_50_steps_json(tmp_path: Path) -> None:
    out = run_cli(["train", "sr3-tiny", "--steps", "50", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = tmp_path / result["run_dir"]
    assert result["run_dir"].startswith("runs/sr3-tiny-") and result["steps"] == 50
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "events.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step-00000050.pt").is_file()
    ev = result["eval"]
    for key in ("loss", "psnr", "ssim", "psnr_bicubic", "ssim_bicubic"):
        assert math.isfinite(ev[key]), key
    assert ev["psnr_bicubic"] > 20  # the baseline is a real photograph, not noise
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["step"] == 50 and rows[-1]["loss"] < 1.0


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
