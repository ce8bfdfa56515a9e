from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from redline.device import DeviceInfo
from redline.distributed import Comm, World
from redline.engine import Engine, EngineConfig
from redline.events import Callback, Dispatcher
from redline.precision import get_precision

from ..conftest import DEVICES
from ..ddpcount import counted_ddp
from ..synccount import HostReads


def _setup(device: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    x = torch.randn(13, 8, device=device)
    y = torch.randint(0, 3, (13,), device=device)
    return model, x, y


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("micro", [1, 4, 5, 13])
def test_micro_batches_give_the_full_batch_gradient(device: str, micro: int) -> None:
    model, x, y = _setup(device)
    ref = copy.deepcopy(model)
    _loss(ref, (x, y)).backward()

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: grads stay inspectable
    engine = Engine(model, opt, "fp32", micro_batch_size=micro)
    loss = engine.step((x, y), _loss)
    assert loss.device.type == torch.device(device).type
    assert loss.item() == pytest.approx(_loss(ref, (x, y)).item(), rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_steps_update_params_and_scheduler() -> None:
    model, x, y = _setup("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    engine = Engine(model, opt, "fp32", scheduler=sched, micro_batch_size=4)
    engine.step((x, y), _loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_grad_clipping_bounds_the_norm() -> None:
    model, x, y = _setup("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = Engine(model, opt, "fp32", grad_clip=1e-3)
    engine.step((x, y), _loss)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert engine.grad_norm.item() > 1e-3  # the norm before clipping is what is reported
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("guard", [False, True])
def test_hot_path_makes_no_host_read(precision: str, guard: bool) -> None:
    """Counted with a dispatch mode: Engine.step adds no read of a tensor's value to what
    the optimizer itself does (SGD reads nothing), micro-batched and guarded or not."""
    model, x, y = _setup("cpu")
    policy = get_precision(precision, DeviceInfo.detect("cpu"))
    model = policy.convert_module(model)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), policy, grad_clip=1.0,
                    micro_batch_size=4, oom_guard=guard)
    with HostReads() as reads:
        for _ in range(3):
            loss = engine.step((x, y), _loss)
    assert reads.count == 0
    assert torch.isfinite(loss)


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_a_nonfinite_step_is_skipped_as_if_it_never_ran(host_reads: bool, kind: str) -> None:
    """skip_nonfinite: the update and the optimizer's step count are untouched by a NaN
    batch, so the run equals one that never saw it; on the device path (the fused
    optimizer's found_inf, what CUDA runs) with no host read."""
    def run(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Engine, nn.Module]:
        model = _setup("cpu")[0]
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, **{kind: True})
        engine = Engine(model, opt, "fp32", grad_clip=1.0, skip_nonfinite=True,
                        host_reads=host_reads)
        with HostReads() as reads:
            for batch in batches:
                engine.step(batch, _loss)
        if kind == "fused":  # (foreach AdamW reads its step counts on the host itself)
            assert reads.count == (len(batches) if host_reads else 0)
        return engine, model

    _, x, y = _setup("cpu")
    nan = (torch.full_like(x, float("nan")), y)
    skipped, a = run([(x, y), nan, (x * 2, y)])
    clean, b = run([(x, y), (x * 2, y)])
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    states = [e.optimizer.state_dict()["state"] for e in (skipped, clean)]
    assert [s["step"] for s in states[0].values()] == [s["step"] for s in states[1].values()]
    assert all(float(s["step"]) == 2 for s in states[0].values())


def test_fp16_scaler_skips_and_the_norm_shows_it() -> None:
    model, x, y = _setup("cpu")
    policy = get_precision("fp16-mixed", DeviceInfo.detect("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(model, opt, policy)
    before = [p.detach().clone() for p in model.parameters()]

    def inf_loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return _loss(m, b) * float("inf")

    scale = policy.scaler.get_scale()
    engine.step((x, y), inf_loss)
    assert not torch.isfinite(engine.grad_norm)  # what telemetry counts as a skipped step
    assert engine.applied is False  # optimizer_step says what it did
    assert policy.scaler.get_scale() < scale  # the scaler backed off
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # the step was skipped
    engine.step((x, y), _loss)
    assert torch.isfinite(engine.grad_norm) and engine.applied is True
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state = engine.state_dict()
    assert "scaler" in state["precision"]


def test_engine_fires_backward_and_optimizer_events() -> None:
    calls: list[str] = []

    class Spy(Callback):
        def on_before_backward(self, state, loss):  # type: ignore[no-untyped-def]
            calls.append("backward")

        def on_before_optimizer_step(self, state, optimizer):  # type: ignore[no-untyped-def]
            calls.append("optimizer")

    model, x, y = _setup("cpu")
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp32",
                    micro_batch_size=5, dispatcher=Dispatcher([Spy()]))
    engine.step((x, y), _loss)
    assert calls == ["backward", "backward", "backward", "optimizer"]


def test_engine_rejects_bad_arguments() -> None:
    model, _, _ = _setup("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_clip"):
        Engine(model, opt, grad_clip=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Engine(model, opt, micro_batch_size=0)
    with pytest.raises(ValueError, match="fp32"):
        Engine(model, opt, precision="fp12")


def test_the_settings_are_one_frozen_config_that_keywords_also_build() -> None:
    model, _, _ = _setup("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = EngineConfig("fp32", grad_clip=1.0, micro_batch_size=4)
    assert Engine(model, opt, config).config == config
    assert Engine(model, opt, "fp32", grad_clip=1.0, micro_batch_size=4).config == config
    assert Engine(model, opt, config, micro_batch_size=2).config.micro_batch_size == 2
    assert config.micro_batch_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grad_clip = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="oom_guard needs a micro_batch_size"):
        EngineConfig(oom_guard=True)
    with pytest.raises(TypeError, match="gradclip"):
        Engine(model, opt, gradclip=1.0)


class _ScriptedComm(Comm):
    """Two ranks as far as the engine knows, in a one-process group: records what each
    agreement sends and answers from `replies` (then: nobody failed, nobody stops)."""

    def __init__(self, replies: list[tuple[int, int]]) -> None:
        super().__init__(World(rank=0, size=2))
        self.sent: list[tuple[int, ...]] = []
        self.replies = replies

    def agree(self, *flags: int) -> list[int]:
        self.sent.append(flags)
        return list(self.replies.pop(0)) if self.replies else [0, 0]


@pytest.fixture
def ddp_counted(tmp_path: Path) -> Iterator[tuple[nn.Module, list[int]]]:
    """A DDP model in a one-process gloo group, and how many times its buckets were
    all-reduced (one bucket)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp, calls = counted_ddp(_setup("cpu")[0])
        yield ddp, calls
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("micro", [4, 13])
def test_under_ddp_each_step_agrees_then_all_reduces_once(
        ddp_counted: tuple[nn.Module, list[int]], micro: int) -> None:
    ddp, calls = ddp_counted
    _, x, y = _setup("cpu")
    ref = _setup("cpu")[0]
    _loss(ref, (x, y)).backward()
    comm = _ScriptedComm([(0, 0), (0, 1)])
    engine = Engine(ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), "fp32",
                    micro_batch_size=micro, oom_guard=True, comm=comm)
    engine.stop_when(lambda: len(comm.sent) == 1)  # asked to stop in the second step
    engine.step((x, y), _loss)
    assert calls == [0] and comm.sent == [(0, 0)] and not engine.stop_agreed
    for p, q in zip(ddp.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    engine.step((x, y), _loss)
    assert calls == [0, 0] and comm.sent == [(0, 0), (0, 1)] and engine.stop_agreed


def test_a_peer_out_of_memory_redoes_the_step_here_with_the_smaller_micro_batch(
        ddp_counted: tuple[nn.Module, list[int]]) -> None:
    """The abandoned attempt's forward ran under no_sync: DDP expects no backward for it,
    and the redo all-reduces once, the full batch's gradient."""
    changes: list[dict[str, object]] = []

    class Spy(Callback):
        def on_micro_batch_change(self, state, info):  # type: ignore[no-untyped-def]
            changes.append(info)

    ddp, calls = ddp_counted
    _, x, y = _setup("cpu")
    ref = _setup("cpu")[0]
    _loss(ref, (x, y)).backward()
    comm = _ScriptedComm([(2, 0)])  # rank 1 ran out of memory in the first attempt
    engine = Engine(ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), "fp32",
                    micro_batch_size=8, oom_guard=True, comm=comm,
                    dispatcher=Dispatcher([Spy()]))
    engine.step((x, y), _loss)
    assert [(c["old"], c["new"], c["reason"], c["phase"]) for c in changes] == [
        (8, 4, "oom", "rank 1")]
    assert engine.micro_batch_size == 4 and calls == [0] and comm.sent == [(0, 0), (0, 0)]
    for p, q in zip(ddp.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


class _Anomalies(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_anomaly(self, state: Any, info: dict[str, Any]) -> None:
        self.seen.append(info)


def _kicked(kind: str, fused: bool, *callbacks: Callback) -> tuple[Engine, Any, _Anomalies]:
    from tests.tasks.doctorcases import Calibrating, InfGradient

    task = {"inf": InfGradient, "calibrating": Calibrating}[kind]()
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if fused else {}))
    seen = _Anomalies()
    engine = Engine(model, opt, "fp16-mixed", dispatcher=Dispatcher([seen, *callbacks]))
    return engine, task, seen


@pytest.mark.parametrize("fused", [True, False])  # the norm's host value; the hook's flag
def test_fp16_skipping_most_updates_is_told_once_a_window_is_over_half(fused: bool) -> None:
    """A gradient inf at every scale: the scaler skips every update. Once more than half
    of a full window of 20 steps was skipped, each skipped step is an anomaly carrying the
    skipped steps in a row, which the trainer counts toward its patience."""
    from redline.precision import SCALER_WINDOW

    engine, task, seen = _kicked("inf", fused)
    batch = (task.x[:16], task.y[:16])
    for step in range(1, SCALER_WINDOW):
        engine.step(batch, task.loss)
        engine.state.step = step
        assert engine.applied is not True
    assert seen.seen == []  # a window not yet full says nothing
    for step in range(SCALER_WINDOW, SCALER_WINDOW + 3):
        engine.step(batch, task.loss)
        engine.state.step = step
    assert [(i["kind"], i["step"], i["run"], i["skipped"]) for i in seen.seen] == [
        ("scaler_skips", 20, 20, 20), ("scaler_skips", 21, 21, 20), ("scaler_skips", 22, 22, 20)]
    assert "bf16-mixed" in seen.seen[0]["message"] and "learning rate" in seen.seen[0]["message"]


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_start_up_calibration_is_not_an_anomaly(fused: bool) -> None:
    """The scaler halving from 65536 to the scale that fits skips its first 7 updates,
    then trains: nothing to tell."""
    engine, task, seen = _kicked("calibrating", fused)
    batch = (task.x[:16], task.y[:16])
    applied = []
    for _ in range(60):
        engine.step(batch, task.loss)
        applied.append(bool(engine.applied) if isinstance(engine.applied, bool)
                       else bool(torch.isfinite(engine.grad_norm)))
    assert applied[:7] == [False] * 7 and all(applied[7:])  # the construction holds
    assert seen.seen == []


@pytest.mark.parametrize("mode, patience, stops_at", [("skip", 10, 20), ("skip", 25, 25),
                                                      ("skip", 0, None), ("warn", 10, None),
                                                      ("stop", 10, 20)])
def test_the_trainer_warns_once_and_counts_the_skips_toward_its_patience(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, patience: int,
        stops_at: int | None) -> None:
    from redline.config import TrainConfig
    from redline.errors import RunStopped
    from redline.run.watch import RunWatch
    from redline.telemetry.jsonl import EventLog, read_jsonl

    train = TrainConfig(on_nonfinite=mode, nonfinite_patience=patience)
    with EventLog(tmp_path / "events.jsonl") as events:
        engine, task, _ = _kicked("inf", False, RunWatch(train, events, lambda step: None))
        batch = (task.x[:16], task.y[:16])
        stopped = None
        for step in range(1, 31):
            try:
                engine.step(batch, task.loss)
            except RunStopped as e:
                stopped, message = step, str(e)
                break
            engine.state.step = step
    assert stopped == stops_at
    err = capsys.readouterr().err
    assert err.count("redline: warning: fp16's loss scaler skipped 20 of the last 20") == 1
    if stopped:
        assert f"skipped {stops_at} updates in a row" in message and "bf16-mixed" in message
    told = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "scaler_skips"]
    assert [(e["step"], e["skipped"]) for e in told] == [(20, 20)]



def test_a_scaler_the_engine_cannot_read_per_step_is_watched_from_the_windows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fused optimizer's skip flag on a GPU is not read per step (a sync): the windows'
    counts feed the watch, a window late; only windows skipped whole make a run."""
    from redline.config import TrainConfig
    from redline.errors import RunStopped
    from redline.events import State
    from redline.precision import ScalerWatch
    from redline.run.watch import RunWatch
    from redline.telemetry import schema as K
    from redline.telemetry.jsonl import EventLog

    scaler = ScalerWatch()
    assert scaler.observe(torch.tensor(True, device="meta"), None, 1) is None
    assert scaler.blind_steps == 1  # a flag on a device: not read
    train = TrainConfig(on_nonfinite="skip", nonfinite_patience=30)
    state = State()
    with EventLog(tmp_path / "events.jsonl") as events:
        watch = RunWatch(train, events, lambda step: None, scaler)
        watch.on_fit_start(state)

        def window(end: int, skipped: int, nonfinite: int = 0) -> None:
            state.step = end
            watch.on_window(state, {K.STEP: end, K.SKIPPED_STEPS: skipped,
                                    K.NONFINITE_STEPS: nonfinite, K.NONFINITE_RUN: nonfinite,
                                    K.FIRST_NONFINITE: end - 1 if nonfinite else None})

        window(10, 7)  # the scaler finding its scale: 7 of 10, the watch not yet full
        window(20, 2, nonfinite=2)  # two bad losses: non-finite steps, not the scaler's
        assert "loss scaler" not in capsys.readouterr().err
        window(30, 10)
        window(40, 10)  # 20 of the last 20: a warning, a run of 20 skips
        assert capsys.readouterr().err.count("fp16's loss scaler skipped 20 of the last 20") == 1
        with pytest.raises(RunStopped, match="skipped 30 updates in a row"):
            window(50, 10)  # 30 in a row: the patience
