"""Precisions as a user meets them on the command line: fp8 emulated, fp8 refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow


def test_fp8_emulated_trains_and_says_everywhere_that_it_is_an_emulation(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--precision", "fp8-emulated", "--steps", "8", "--json",
                   "--run-dir", "r", "--no-progress", "--set", "task_args.depth=3",
                   "--set", "task_args.hidden=128", "--set", "telemetry.log_every=4"], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["precision"] == "fp8-emulated" and result["emulated"] is True
    assert "emulation" in out.stderr and "no speed-up" in out.stderr
    windows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert windows and all(r["precision/emulated"] == 1 for r in windows)
    plan = next(e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
                if e["event"] == "fp8_layers")
    assert [layer["converted"] for layer in plan["layers"]] == [False, True, True, False]
    assert "first Linear" in plan["layers"][0]["reason"]
    assert "not a multiple of 16" in plan["layers"][-1]["reason"]
    human = run_cli(["train", TOY, "--precision", "fp8-emulated", "--steps", "2",
                     "--run-dir", "h", "--no-progress"], tmp_path)
    assert "fp8-emulated (an emulation: its numerics, no speed-up)" in human.stdout


def test_fp8_on_a_cpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--precision", "fp8", "--steps", "2", "--run-dir", "r"],
                  tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "compute capability 8.9" in out.stderr and "fp8-emulated" in out.stderr
    assert not (tmp_path / "r").exists()  # bad input leaves no empty run directory
    bad = run_cli(["train", TOY, "--set", "precision.fp8_recipe=blockwise"], tmp_path)
    assert bad.returncode == 2 and "tensorwise or rowwise" in bad.stderr
