"""The framework recorder's run directory is claimed and started through run/rundir.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

from redline.integrations.recorder import RunRecorder
from redline.run import rundir
from redline.run.rundir import RunDirBusy
from redline.telemetry.config import TelemetryConfig


def _recorder(run_dir: Path) -> RunRecorder:
    return RunRecorder(run_dir, TelemetryConfig(trackers=("jsonl",)), framework="lightning",
                       device="cpu")


def test_a_framework_run_writes_the_start_files_a_redline_run_does(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path / "run")
    recorder.start({"lr": 0.1, "module": object()}, max_steps=2, samples_per_step=4)
    try:
        config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert config["framework"] == {"name": "lightning"} and config["lr"] == 0.1
        assert config["module"].startswith("<object object")  # an object, as its str
        env = json.loads((tmp_path / "run" / "environment.json").read_text())
        assert env["run"] == {"framework": "lightning", "max_steps": 2}
    finally:
        recorder.finish(0)


def test_a_framework_run_cannot_take_a_directory_another_run_holds(tmp_path: Path) -> None:
    with contextlib.ExitStack() as held:
        rundir.lock(tmp_path / "run", "sr3-tiny", held)
        with pytest.raises(RunDirBusy):
            _recorder(tmp_path / "run").start({}, max_steps=2, samples_per_step=4)
    recorder = _recorder(tmp_path / "run")  # released: the framework run may take it
    recorder.start({}, max_steps=2, samples_per_step=4)
    recorder.finish(0)


def test_a_framework_run_writes_the_keys_doctor_reads(tmp_path: Path) -> None:
    from redline.integrations.recorder import framework_settings

    settings = framework_settings("lightning", accumulate=4, precision="bf16-mixed",
                                  precision_name="bf16-mixed", micro_batch=8, log_every=5,
                                  num_workers=0)
    recorder = _recorder(tmp_path / "run")
    recorder.start(settings, max_steps=2, samples_per_step=32)
    recorder.finish(0)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["framework"] == {"name": "lightning", "accumulate": 4,
                                   "precision": "bf16-mixed", "num_workers": 0}
    assert config["precision"] == {"name": "bf16-mixed"}
    assert config["train"] == {"batch_size": 8, "effective_batch_size": 32}
    assert config["telemetry"] == {"log_every": 5}
