"""The training loop's telemetry: what a non-logging step costs, and what a window holds."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from redline.config import load_config
from redline.events import Callback, State
from redline.telemetry.jsonl import read_jsonl
from redline.telemetry.metrics import MetricsLogger
from redline.trainer import Trainer

from ..conftest import TOY

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class _SyncCounter(Callback):
    """Counts host reads of tensors made by redline's own code, per step."""

    def __init__(self) -> None:
        self.calls = 0
        self.per_step: dict[int, int] = {}

    def on_step_end(self, state: State, loss: torch.Tensor) -> None:
        self.per_step[state.step] = self.calls
        self.calls = 0


@pytest.mark.parametrize("path", ["device", "cpu"])
def test_steps_that_do_not_log_make_no_host_sync(tmp_path: Path, path: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path (what CUDA runs: tensors appended, read at window boundaries only)
    is forced here on CPU tensors; the CPU path reads its host floats through host_float,
    which is no sync where there is no device, and is the one read allowed."""
    counter = _SyncCounter()
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    if path == "device":
        real_init = MetricsLogger.__init__

        def device_path(self: MetricsLogger, *args: object, **kwargs: object) -> None:
            real_init(self, *args, **kwargs)  # type: ignore[arg-type]
            self._host = False

        monkeypatch.setattr(MetricsLogger, "__init__", device_path)

    def counting(name: str):  # type: ignore[no-untyped-def]
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            frame = sys._getframe(1).f_code
            caller = frame.co_filename
            # The sampler's per-epoch permutation is made on the host by design (data.py);
            # examples are user code. Everything else in redline is held to no reads.
            if f"{os.sep}redline{os.sep}" in caller and not caller.endswith(
                    (f"{os.sep}data.py",)) and f"{os.sep}examples{os.sep}" not in caller \
                    and frame.co_name != "host_float":
                counter.calls += 1
            return real[name](self, *args, **kwargs)
        return read

    config = load_config(None, [f"task={TOY}", "train.steps=30", "telemetry.log_every=10",
                                "train.eval_every=0", "checkpoint.every=0"])
    trainer = Trainer(config, run_dir=tmp_path / "r", callbacks=[counter], progress=False)

    class Arm(Callback):
        def on_fit_start(self, state: State) -> None:
            for name in HOST_READS:
                monkeypatch.setattr(torch.Tensor, name, counting(name))

    trainer.user_callbacks.insert(0, Arm())
    trainer.fit()
    monkeypatch.undo()
    # The counter sees each step's reads at that step's STEP_END, which it receives after
    # the window logger: a boundary's read shows up at the boundary step.
    quiet = {s: n for s, n in counter.per_step.items() if s % 10 != 0}
    assert quiet and all(n == 0 for n in quiet.values()), quiet
    windows = [counter.per_step[s] for s in (10, 20, 30)]
    if path == "device":  # a window reads its values once (on CUDA: a window later,
        assert all(n >= 1 for n in windows)  # which bench/gpu_check.py checks for syncs)
    else:  # the CPU path's window reads nothing more: its floats are summed already
        assert windows == [0, 0, 0]


def test_window_records_hold_the_promised_metrics(tmp_path: Path) -> None:
    config = load_config(None, [f"task={TOY}", "train.steps=20", "telemetry.log_every=5",
                                "train.eval_every=0", "memory.budget=64MiB"])
    Trainer(config, run_dir=tmp_path / "r", progress=False).fit()
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_pct",
                "mfu", "peak_flops", "mem_peak_bytes", "mem_pct", "micro_batch",
                "accumulation_steps", "effective_batch", "skipped_steps",
                "redline/overhead_pct", "redline/host_syncs"):
        assert key in rows[-1], key
    last = rows[-1]
    assert 0 < last["mfu"] < 1 and last["peak_flops"] > 0
    assert 0 < last["mem_pct"] < 100 and last["micro_batch"] == 16
    assert 0 <= last["redline/overhead_pct"] < 100 and last["redline/host_syncs"] == 0
    events = Counter(e["event"] for e in read_jsonl(tmp_path / "r" / "events.jsonl"))
    assert events["flops"] == 1  # counted once, at start
    system = read_jsonl(tmp_path / "r" / "system.jsonl")
    assert system and "proc/rss_bytes" in system[0]


def test_a_task_can_declare_its_flops(tmp_path: Path) -> None:
    from tests.tasks.toy import ToyRegression

    class Declared(ToyRegression):
        def flops_per_sample(self) -> float:
            return 1000.0  # e.g. from analytic_transformer_flops for a sequence model

    config = load_config(None, ["train.steps=4", "train.eval_every=0"])
    Trainer(config, task=Declared(), run_dir=tmp_path / "r", progress=False).fit()
    flops = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["event"] == "flops"]
    assert flops[0]["flops_per_step"] == 16_000  # 1000 per sample x 16 samples per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_cpu_path_sums_the_steps_it_saw(dtype: torch.dtype) -> None:
    from redline.telemetry.metrics import WindowContext

    class Engine:
        grad_norm = torch.tensor(0.0)
        micro_batch_size = None

    records: list[dict] = []
    logger = MetricsLogger(3, WindowContext(samples_per_step=4, device=torch.device("cpu")),
                           lambda stream, r: records.append(r), Engine())
    state = State(max_steps=6)
    logger.on_fit_start(state)
    for step, (loss, norm) in enumerate([(1.0, 2.0), (2.0, float("inf")), (3.0, 1.5),
                                         (4.0, 1.0), (5.0, float("nan")), (6.0, 0.5)], 1):
        Engine.grad_norm = torch.tensor(norm, dtype=dtype)
        state.step = step
        logger.on_step_end(state, torch.tensor(loss, dtype=dtype))
    assert [(r["step"], r["loss"], r["skipped_steps"]) for r in records] == [(3, 2.0, 1),
                                                                            (6, 5.0, 1)]
    assert records[0]["grad_norm"] == 1.5 and records[1]["grad_norm"] == 0.5
