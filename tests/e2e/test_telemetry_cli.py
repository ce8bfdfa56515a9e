"""Telemetry as a user sees it: trackers read back, W&B resume, doctor RUN_DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each

WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
ARGS = ["train", TOY, "--run-dir", "r", "--set", "telemetry.log_every=5",
        "--set", "train.eval_every=0", "--tracker", "tensorboard", "--tracker", "wandb"]


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from redline.telemetry.wandb_reader import find_run_files, read_history

    out = run_cli([*ARGS, "--steps", "20"], tmp_path, env={**WANDB_ENV,
                                                             "WANDB_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    run = tmp_path / "r"
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(rows) == [5, 10, 15, 20]

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(tb) == [5, 10, 15, 20]
    for step, value in tb.items():
        assert value == pytest.approx(rows[step]["loss"], rel=1e-6)

    files = find_run_files(run)
    assert files
    history = [h for h in read_history(files[0]) if "loss" in h]
    assert [h["_step"] for h in history] == [5, 10, 15, 20]
    assert history[-1]["loss"] == pytest.approx(rows[20]["loss"], rel=1e-6)


def test_resume_continues_the_same_wandb_run(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    env = {**WANDB_ENV, "WANDB_DIR": str(tmp_path)}
    first = run_cli([*ARGS, "--steps", "10"], tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "step-00000010.pt", weights_only=True)
    run_id = ckpt["tracker_run_id"]
    assert run_id
    again = run_cli([*ARGS, "--steps", "20", "--resume"], tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    from redline.telemetry.wandb_reader import find_run_files

    files = find_run_files(tmp_path / "r")
    assert len(files) == 2 and all(run_id in f.name for f in files)


def test_a_failing_sink_is_reported_once_and_training_goes_on(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "tensorboard").write_text("a file where a directory should be")
    out = run_cli(["train", TOY, "--run-dir", "r", "--steps", "10", "--tracker", "tensorboard",
                   "--set", "telemetry.log_every=5", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("tensorboard") >= 1
    events = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
              if e["event"] == "sink_failed"]
    assert len(events) <= 1
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r] \
        == [5, 10]


def test_doctor_run_dir_says_where_time_went(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--run-dir", "r", "--steps", "30",
                   "--set", "telemetry.log_every=5", "--set", "train.eval_every=0"], tmp_path)
    assert out.returncode == 0, out.stderr
    text = run_cli(["doctor", "r"], tmp_path)
    assert text.returncode == 0, text.stderr
    assert "telemetry" in text.stdout and "%" in text.stdout
    as_json = run_cli(["doctor", "r", "--json"], tmp_path)
    report = json.loads(as_json.stdout.strip().splitlines()[-1])
    kinds = {f["kind"] for f in report["findings"]}
    assert "telemetry-overhead" in kinds and "precision" in kinds  # fp32 on a bf16 CPU
    missing = run_cli(["doctor", "nope"], tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


USER_SINK = '''\
import json
from pathlib import Path


class Recorder:
    """A sink of the user's own: every metrics record, one JSON line, in its own file."""

    name = "recorder"

    def __init__(self, context):
        self.path = Path(context.run_dir) / "recorded.jsonl"
        self.file = self.path.open("a")

    def write(self, stream, records):
        if stream == "metrics":
            for record in records:
                self.file.write(json.dumps(record) + "\\n")

    def close(self):
        self.file.close()


class Broken(Recorder):
    name = "broken"

    def write(self, stream, records):
        raise RuntimeError("bug in my sink")
'''


def test_a_users_own_sink_runs_in_the_writer_process(tmp_path: Path) -> None:
    (tmp_path / "my_sinks.py").write_text(USER_SINK)
    out = run_cli(["train", TOY, "--run-dir", "r", "--steps", "10", "--tracker",
                   "my_sinks.py:Recorder", "--tracker", "my_sinks.py:Broken",
                   "--set", "telemetry.log_every=5", "--set", "train.eval_every=0"], tmp_path)
    assert out.returncode == 0, out.stderr
    mine = [r for r in read_jsonl(tmp_path / "r" / "recorded.jsonl") if "loss" in r]
    assert [r["step"] for r in mine] == [5, 10]
    assert mine == [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    # the broken one: its traceback (the user's code), one report, training went on
    assert "bug in my sink" in out.stderr and "Traceback" in out.stderr
    failed = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
              if e["event"] == "sink_failed"]
    assert [e["sink"] for e in failed] == ["broken"]
    bad = run_cli(["train", TOY, "--steps", "2", "--tracker", "nowhere.py:Sink"], tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


SLOW_SINKS = '''\
import json, time
from pathlib import Path


class SlowToConnect:
    """Starts only once the run has saved its last step (or after 120 s), like a tracker
    slow to reach its server; then records what it got. Waiting on the run, not on a
    clock, makes "trained while it connected" hold on a loaded machine too, and a step
    that waited for this sink would hold the run back past the 120 s."""

    name = "slow"

    def __init__(self, context):
        events = Path(context.run_dir) / "events.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                events.is_file() and '"checkpoint_saved","step":20' in events.read_text()):
            time.sleep(0.05)
        self.path = Path(context.run_dir) / "slow.jsonl"
        self.path.write_text(json.dumps({"ready_at": time.time()}) + "\\n")

    def write(self, stream, records):
        with self.path.open("a") as f:
            for r in records:
                if stream == "metrics" and "loss" in r:
                    f.write(json.dumps(r) + "\\n")

    def close(self):
        pass


class NeverConnects:
    name = "offline-server"

    def __init__(self, context):
        time.sleep(2)
        raise ConnectionError("no route to the tracker's server")
'''


def test_trackers_that_start_slowly_or_never_delay_no_step(tmp_path: Path) -> None:
    (tmp_path / "slow_sinks.py").write_text(SLOW_SINKS)
    out = run_cli(["train", TOY, "--run-dir", "r", "--steps", "20", "--tracker",
                   "slow_sinks.py:SlowToConnect", "--tracker", "slow_sinks.py:NeverConnects",
                   "--set", "telemetry.log_every=5", "--set", "train.eval_every=0"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    slow = read_jsonl(tmp_path / "r" / "slow.jsonl")
    ready_at = slow[0]["ready_at"]
    assert rows and all(r["time"] < ready_at for r in rows)  # trained while it connected
    assert [r["step"] for r in slow[1:]] == [r["step"] for r in rows]  # and it got them all
    failed = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
              if e["event"] == "sink_failed"]
    assert [e["sink"] for e in failed] == ["slow_sinks.py:NeverConnects"]
    assert "no route to the tracker's server" in out.stderr
