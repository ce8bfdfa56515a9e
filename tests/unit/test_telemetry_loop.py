"""The training loop's telemetry: what a step costs in host reads, and what a window holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from redline.config import load_config
from redline.engine import Engine
from redline.events import Callback, State
from redline.job.build import build_optimizer
from redline.run.trainer import Trainer
from redline.task import resolve_task
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.jsonl import read_jsonl
from redline.telemetry.metrics import WindowContext, WindowLogger
from redline.telemetry.session import Telemetry

from ..conftest import TOY
from ..synccount import HostReads


class _PerStep(Callback):
    """Host reads counted per optimizer step (the loop's whole step, telemetry included)."""

    def __init__(self, mode: HostReads) -> None:
        self.mode, self.per_step, self._seen = mode, dict[int, int](), 0

    def on_batch_start(self, state: State, batch: Any) -> None:
        self._seen = self.mode.count

    def close(self, step: int) -> None:
        self.per_step[step] = self.mode.count - self._seen


def _bare_reads_per_step(steps: int) -> list[int]:
    """The same task and optimizer in a hand-written loop: what torch itself reads."""
    task = resolve_task(TOY)
    model = task.build_model()
    opt = build_optimizer(model, 2e-4)
    data = task.train_data()
    counts = []
    with HostReads() as mode:
        for i in range(steps):
            x, y = torch.utils.data.default_collate([data[j] for j in range(16 * i, 16 * i + 16)])
            before = mode.count
            opt.zero_grad(set_to_none=True)
            task.loss(model, (x, y)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            counts.append(mode.count - before)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("inspect_every", [0, 4])
def test_redline_adds_only_its_documented_reads_per_step(tmp_path: Path,
                                                         inspect_every: int) -> None:
    """Counted with a dispatch mode: on CPU, redline reads each step's loss and gradient
    norm as two floats for telemetry (host memory, no device to wait for: metrics.py) and
    the norm once more for train.on_nonfinite's skip (engine/update.py), and nothing else, on
    logging steps and quiet ones alike; everything else is what torch's own AdamW reads
    in a hand-written loop. The device path is held to zero below and in test_engine.
    Per-layer statistics (inspect.every=4: steps 4, 8, ... inspect) add none on the steps
    that do not inspect; on a CPU an inspecting step reads one flag per statistics call
    (free there; the device path reads nothing: test_inspector)."""
    config = load_config(None, [f"task={TOY}", "train.steps=24", "telemetry.log_every=8",
                                "train.eval_every=0", "checkpoint.every=0",
                                f"inspect.every={inspect_every}"])
    with HostReads() as mode:
        counter = _PerStep(mode)

        class Close(Callback):  # after the loop's telemetry call: STEP_END of the next step
            def on_batch_start(self, state: State, batch: Any) -> None:
                if state.step:
                    counter.close(state.step)

        Trainer(config, run_dir=tmp_path / "r", callbacks=[Close(), counter],
                progress=False).fit()
    bare = _bare_reads_per_step(24)
    extra = {step: n - bare[step - 1] for step, n in counter.per_step.items()}
    assert sorted(extra) == list(range(1, 24))
    inspecting = {s for s in extra if inspect_every and s % inspect_every == 0}
    # window-closing steps 8 and 16 included; an inspecting step on a CPU reads one
    # "all finite?" flag per statistics call (parameters and gradients, 2 layers' outputs)
    assert {s: n for s, n in extra.items() if s not in inspecting} == dict.fromkeys(
        set(extra) - inspecting, 3), extra
    assert {extra[s] for s in inspecting} <= {3 + 3}, extra
    inspected = sorted(p.name for p in (tmp_path / "r" / "stats" / "layers").glob("*"))
    assert len(inspected) == (6 if inspect_every else 0)


def test_the_device_path_reads_nothing_on_any_step() -> None:
    """What a GPU runs (tensors kept, stacked at the window; read a window later from
    pinned memory), forced on CPU tensors: no read of a tensor's value, on any step."""
    records: list[dict[str, Any]] = []
    logger = WindowLogger(4, WindowContext(samples_per_step=8, device=torch.device("cpu")),
                          records.append, host_reads=False)
    logger.start()
    with HostReads() as mode:
        for step in range(1, 13):
            loss, norm = torch.rand(()), torch.rand(()) + 1
            logger.record(step, loss, norm, 8, 1e-3, 0, 8 * step, 0.0, step == 12)
            assert mode.count == 0, step
        logger.finish()
    assert [r["step"] for r in records] == [4, 8, 12]


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


def test_a_cpu_run_without_a_budget_records_its_resident_memory(tmp_path: Path) -> None:
    config = load_config(None, [f"task={TOY}", "train.steps=10", "telemetry.log_every=5",
                                "train.eval_every=0"])
    Trainer(config, run_dir=tmp_path / "r", progress=False).fit()
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    for r in rows:
        assert 10 * 2**20 < r["mem_rss_bytes"] <= r["mem_rss_peak_bytes"]
        assert 0 < r["mem_pct"] < 100  # of physical memory
        assert "mem_peak_bytes" not in r  # no tracker ran: no tensor-memory count


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
    records: list[dict] = []
    logger = WindowLogger(3, WindowContext(samples_per_step=4, device=torch.device("cpu"),
                                           skip_nonfinite=True), records.append)
    logger.start()
    for step, (loss, norm) in enumerate([(1.0, 2.0), (2.0, float("inf")), (3.0, 1.5),
                                         (4.0, 1.0), (5.0, float("nan")), (6.0, 0.5)], 1):
        logger.record(step, torch.tensor(loss, dtype=dtype), torch.tensor(norm, dtype=dtype),
                      None, None, 0, 4 * step, 0.0, step == 6)
    assert [(r["step"], r["loss"], r["skipped_steps"], r["nonfinite_steps"],
             r["first_nonfinite_step"]) for r in records] == [(3, 2.0, 1, 1, 2),
                                                              (6, 5.0, 1, 1, 5)]
    assert records[0]["grad_norm"] == 1.5 and records[1]["grad_norm"] == 0.5


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize(("skip", "scaled", "expected"), [
    # (skip_nonfinite, loss_scaled) -> per window: (loss, skipped, nonfinite, longest run)
    (True, False, [(4.0, 3, 4, 4), (6.0, 1, 2, 6)]),  # the run goes on from step 2 to 7
    (False, False, [(4.0, 0, 4, 4), (6.0, 0, 2, 6)]),  # warn: nothing skipped
    (False, True, [(4.0, 3, 2, 2), (6.0, 1, 1, 3)]),  # the scaler's overflows are its own
])
def test_non_finite_steps_are_tallied_in_either_path(host_reads: bool, skip: bool,
                                                     scaled: bool, expected: list) -> None:
    nan, inf = float("nan"), float("inf")
    steps = [(1.0, 1.0), (2.0, inf), (9.0, nan), (nan, nan), (nan, 1.0),  # window 1..5
             (nan, 2.0), (6.0, inf), (6.0, 1.0), (6.0, 1.0), (6.0, 1.0)]  # window 6..10
    records: list[dict] = []
    logger = WindowLogger(5, WindowContext(samples_per_step=4, device=torch.device("cpu"),
                                           skip_nonfinite=skip, loss_scaled=scaled),
                          records.append, host_reads=host_reads)
    logger.start()
    for step, (loss, norm) in enumerate(steps, 1):
        logger.record(step, torch.tensor(loss), torch.tensor(norm), 4, None, 0, 4 * step,
                      0.0, step == 10)
    logger.finish()
    got = [(r["loss"], r["skipped_steps"], r["nonfinite_steps"], r["nonfinite_run_max"])
           for r in records]
    assert got == [(pytest.approx(loss), *rest) for loss, *rest in expected]


class _EveryOtherWindow(Callback):
    """A callback's own metric at its own cadence: computed on some steps, added to a window."""

    def __init__(self) -> None:
        self.windows = 0
        self.pending: torch.Tensor | None = None

    def on_step_end(self, state: State, loss: torch.Tensor) -> None:
        if state.step % 10 == 0:
            self.pending = loss.detach() * 2  # stays on the device until the window

    def on_window(self, state: State, record: dict[str, Any]) -> None:
        self.windows += 1
        if self.windows % 2 == 0 and self.pending is not None:
            record["mine/double_loss"] = float(self.pending)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = state["windows"]


@pytest.mark.slow
def test_callbacks_see_each_window_and_add_their_own_metrics(tmp_path: Path) -> None:
    config = load_config(None, [f"task={TOY}", "train.steps=40", "telemetry.log_every=10",
                                "train.eval_every=0", "checkpoint.every=20"])
    mine = _EveryOtherWindow()
    Trainer(config, run_dir=tmp_path / "r", callbacks=[mine], progress=False).fit()
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert [("mine/double_loss" in r) for r in rows] == [False, True, False, True]
    assert mine.windows == 4


@pytest.mark.slow
def test_callback_state_is_kept_across_a_resume(tmp_path: Path) -> None:
    args = [f"task={TOY}", "telemetry.log_every=10", "train.eval_every=0"]
    first = _EveryOtherWindow()
    Trainer(load_config(None, [*args, "train.steps=30"]), run_dir=tmp_path / "r",
            callbacks=[first], progress=False).fit()
    again = _EveryOtherWindow()
    Trainer(load_config(None, [*args, "train.steps=50"]), run_dir=tmp_path / "r", resume=True,
            callbacks=[again], progress=False).fit()
    assert (first.windows, again.windows) == (3, 5)  # 3 windows, then 2 more after resuming


@pytest.mark.slow
def test_telemetry_in_your_own_loop(tmp_path: Path) -> None:
    """No Trainer: an Engine, a loop, and Telemetry fed explicit values."""
    task = resolve_task(TOY)
    model = task.build_model()
    opt = build_optimizer(model, 1e-3)
    engine = Engine(model, opt, "fp32", grad_clip=1.0, micro_batch_size=8)
    data = task.train_data()
    telemetry = Telemetry(tmp_path / "mine", TelemetryConfig(log_every=5), device="cpu",
                          samples_per_step=16, max_steps=20)
    with telemetry:
        for step in range(1, 21):
            batch = torch.utils.data.default_collate([data[i] for i in range(16)])
            loss = engine.step(batch, task.loss)
            telemetry.record_step(step, loss, engine.grad_norm,
                                  micro_batch=engine.micro_batch_size, lr=1e-3)
            if step == 10:
                with telemetry.paused():
                    telemetry.record_eval(step, {"mae": 0.5})
    rows = read_jsonl(tmp_path / "mine" / "metrics.jsonl")
    windows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in windows] == [5, 10, 15, 20]
    assert all(r["micro_batch"] == 8 and r["accumulation_steps"] == 2 for r in windows)
    assert [r["eval/mae"] for r in rows if "eval/mae" in r] == [0.5]
    assert (tmp_path / "mine" / "system.jsonl").is_file()


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("log_every", "expected_pct"), [(1, 100 * 5 / 7), (10, 100 * 5 / 25)])
def test_overhead_pct_is_redlines_share_of_the_window(log_every: int,
                                                      expected_pct: float) -> None:
    """With steps of 2 ms outside redline and a window close that takes 5 ms, each window
    holds the previous close and its own steps: 5 / (5 + 2 x log_every) of it is redline's.
    (It used to leave the close out of the window's time, not of its overhead: 1-step
    windows then read 250 %.)"""
    clock = _FakeClock()
    records: list[dict] = []

    def slow_publish(record: dict) -> None:
        clock.now += 0.005
        records.append(record)

    logger = WindowLogger(log_every, WindowContext(samples_per_step=4,
                                                   device=torch.device("cpu")),
                          slow_publish, clock=clock)
    logger.start()
    for step in range(1, 6 * log_every + 1):
        clock.now += 0.002  # the step itself
        logger.record(step, torch.tensor(1.0), torch.tensor(1.0), 4, None, 0, 4 * step, 0.0,
                      False)
    shares = [r["redline/overhead_pct"] for r in records]
    assert shares[0] == 0.0  # nothing of redline's came before the first close
    for share in shares[1:]:
        assert share == pytest.approx(expected_pct, rel=1e-6)
    assert all(r["step_time_s"] == pytest.approx(0.002 + 0.005 / log_every) for r in records[1:])
