"""The hub and its writer process: records reach the files, and training never waits."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from redline.telemetry.hub import Hub
from redline.telemetry.jsonl import read_jsonl


def record(step: int, pad: int = 0) -> dict[str, Any]:
    return {"step": step, "loss": 1.0 / step, "pad": "x" * pad}


def cpu_sampler(every_s: float = 0.05) -> dict[str, Any]:
    return {"kind": "cpu", "index": None, "uuid": None, "pid": os.getpid(),
            "every_s": every_s, "slow_every_s": every_s}


class Said:
    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def hub(self, run_dir: Path, trackers: list[str], **kw: Any) -> Hub:
        return Hub(trackers, run_dir, on_failure=lambda n, w: self.failures.append((n, w)),
                   on_note=self.notes.append, **kw)


def test_records_and_samples_reach_the_files_through_the_writer(tmp_path: Path) -> None:
    said = Said()
    hub = said.hub(tmp_path, ["jsonl"], sampler=cpu_sampler())
    for step in (10, 20, 30):
        hub.publish("metrics", record(step))
    assert hub.flush()  # answered by the writer once the three lines are written
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    time.sleep(0.2)
    hub.close()
    samples = read_jsonl(tmp_path / "system.jsonl")
    # the writer's sampler reads *this* process: its RSS, not the writer's own
    assert samples and all(s["proc/rss_bytes"] > 50e6 for s in samples)
    assert any("no GPU" in n for n in said.notes) and not said.failures


def test_the_training_process_runs_no_telemetry_work_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    hub = Said().hub(tmp_path, ["jsonl", "console"], sampler=cpu_sampler())
    new = [t.name for t in set(threading.enumerate()) - before]
    assert hub._proc is not None
    # a terminal's Ctrl-C goes to the trainer alone, which saves before the writer closes
    assert os.getsid(hub._proc.pid) != os.getsid(0)
    hub.close()
    # only the listener, asleep in a read of the writer's stdout; sinks and sampler are
    # in the writer process, where their Python cannot take the GIL from training
    assert new == ["redline-telemetry-listener"]


def test_publish_never_blocks_on_a_stalled_writer(tmp_path: Path) -> None:
    hub = Said().hub(tmp_path, ["jsonl"])
    assert hub._proc is not None
    os.kill(hub._proc.pid, signal.SIGSTOP)  # the writer is stuck: its pipe fills up

    def publish() -> None:
        for step in range(1, 401):  # 400 lines of ~1 KB: several times a pipe's buffer
            hub.publish("metrics", record(step, pad=1000))

    publisher = threading.Thread(target=publish, daemon=True)
    try:
        publisher.start()
        # a blocked write would wait for the stopped writer forever: the join's timeout
        # only tells a deadlock from a slow machine, it measures no speed
        publisher.join(timeout=120)
        assert not publisher.is_alive(), "publish blocked on a stalled writer"
        assert hub._backlog  # what did not fit waits here, not in a blocked write
    finally:
        os.kill(hub._proc.pid, signal.SIGCONT)
    hub.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 401))


def test_a_dead_writer_is_reported_once_and_jsonl_goes_on(tmp_path: Path) -> None:
    said = Said()
    hub = said.hub(tmp_path, ["jsonl", "tensorboard"])
    hub.publish("metrics", record(1))
    assert hub.flush()
    assert hub._proc is not None
    hub._proc.kill()
    hub._proc.wait()
    for _ in range(50):  # the listener sees the writer's stdout end
        if hub._exited:
            break
        time.sleep(0.05)
    for step in (2, 3):
        hub.publish("metrics", record(step))
    hub.close()
    assert [name for name, _ in said.failures] == ["writer"]
    assert "tensorboard off" in said.failures[0][1] and "tensorboard" in hub.failed
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_sink_that_cannot_start_is_reported_and_the_others_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    said = Said()
    hub = said.hub(tmp_path, ["jsonl", "wandb"], options={"wandb_mode": "sideways"})
    hub.publish("metrics", record(5))
    hub.close()
    assert [name for name, _ in said.failures] == ["wandb"]
    assert "sideways" in said.failures[0][1] and list(hub.failed) == ["wandb"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [5]


@pytest.mark.slow
def test_the_writer_starts_its_own_wandb_service(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    # what wandb.init leaves in this process's environment: its service's address, stale
    # once that service is gone
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/nonexistent/socket")
    monkeypatch.setenv("WANDB_SILENT", "true")
    said = Said()
    hub = said.hub(tmp_path, ["wandb"], options={"wandb_mode": "offline"})
    hub.publish("metrics", record(5))
    hub.close()
    assert not said.failures and hub.run_id
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
