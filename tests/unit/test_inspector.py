"""Per-layer statistics: equal to the same quantities computed by hand, at the cadence asked,
readable by pandas in one call, and never on a step that does not inspect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from redline.config import ConfigError, load_config
from redline.engine import Engine
from redline.events import Dispatcher, Event, State
from redline.inspector import InspectConfig, Inspector, read_rows, select_layers
from redline.job.build import build_optimizer
from redline.run.trainer import Trainer
from redline.stats import STAT_NAMES, fp8_stats, tensor_stats

from ..conftest import TOY


def _by_hand(t: torch.Tensor) -> dict[str, float]:
    f = t.detach().double().flatten()
    return {"norm": f.norm().item(), "mean": f.mean().item(), "std": f.std(unbiased=False).item(),
            "min": f.min().item(), "max": f.max().item(), "absmax": f.abs().max().item(),
            "zero_frac": (f == 0).double().mean().item(), "nan": 0.0, "inf": 0.0}


def test_tensor_stats_equal_the_quantities_computed_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g), torch.relu(torch.randn(40, generator=g))]
    got = tensor_stats(tensors)
    for row, t in zip(got.tolist(), tensors, strict=True):
        assert dict(zip(STAT_NAMES, row, strict=True)) == pytest.approx(_by_hand(t), rel=1e-5,
                                                                        abs=1e-6)
    bad = tensor_stats([torch.tensor([1.0, float("nan"), float("inf"), 0.0])])[0].tolist()
    assert bad[STAT_NAMES.index("nan")] == 1 and bad[STAT_NAMES.index("inf")] == 1
    assert bad[STAT_NAMES.index("zero_frac")] == 0.25


def test_the_host_read_shortcut_gives_the_same_figures() -> None:
    g = torch.Generator().manual_seed(1)
    finite = [torch.randn(50, generator=g), torch.zeros(3)]
    assert torch.equal(tensor_stats(finite, host_reads=True), tensor_stats(finite))
    bad = [torch.tensor([1.0, float("nan"), float("inf"), float("-inf")]), torch.ones(2)]
    got = tensor_stats(bad, host_reads=True)
    assert torch.equal(got[:, 7:], tensor_stats(bad)[:, 7:])
    assert got[0, STAT_NAMES.index("nan")] == 1 and got[0, STAT_NAMES.index("inf")] == 2


def test_the_device_path_reads_nothing_on_an_inspecting_step(tmp_path: Path) -> None:
    from ..synccount import HostReads

    model = _model()
    counts = {}
    for host_reads in (False, None):
        inspector = Inspector(InspectConfig(every=1), tmp_path / str(host_reads),
                              host_reads=host_reads)
        state = State(model=model, run_dir=str(tmp_path))
        dispatcher = Dispatcher([inspector])
        engine = Engine(model, build_optimizer(model, 1e-2), dispatcher=dispatcher, state=state)
        dispatcher.fire(Event.FIT_START, state)
        batch = (torch.randn(8, 4), torch.zeros(8, 1))
        loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
        engine.step(batch, loss)  # warm-up, not inspected
        with HostReads() as mode:
            engine.step(batch, loss)
            bare = mode.count
            dispatcher.fire(Event.BATCH_START, state, batch)
            engine.step(batch, loss)
            counts[host_reads] = mode.count - 2 * bare
    assert counts[False] == 0  # what runs on a GPU: no read at all
    assert counts[None] == 4  # on a CPU: one flag per call (params+grads, 3 layer outputs)


def test_fp8_stats_count_what_an_e4m3_cast_flushes_to_zero() -> None:
    amax, saturated, underflow = fp8_stats(torch.tensor([1e-9, -1e-9, 0.5, 2.0])).tolist()
    assert amax == 2.0 and saturated == 0.0 and underflow == 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 1))


def test_layers_are_selected_by_name_or_type_pattern() -> None:
    model = _model()
    assert list(select_layers(model, ())) == ["0", "2", "3"]
    assert list(select_layers(model, ("norm",))) == ["2"]
    assert list(select_layers(model, ("^3$", "layernorm"))) == ["2", "3"]


def _steps(tmp_path: Path, every: int, steps: int = 4) -> tuple[nn.Module, list[dict]]:
    """A hand-written loop through the Engine, the Inspector attached: the model as it was
    just before the inspected step's update, and that step's recorded rows."""
    model = _model()
    inspector = Inspector(InspectConfig(every=every), tmp_path)
    state = State(model=model, run_dir=str(tmp_path))
    dispatcher = Dispatcher([inspector])
    engine = Engine(model, build_optimizer(model, 1e-2), dispatcher=dispatcher, state=state)
    dispatcher.fire(Event.FIT_START, state)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.ones(16, 1)
    before = {}
    for _ in range(steps):
        dispatcher.fire(Event.BATCH_START, state, (x, y))
        if state.step + 1 == every:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine.step((x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        state.step += 1
        dispatcher.fire(Event.WINDOW, state, {"step": state.step})
    return model, [r for r in read_rows(tmp_path) if r["step"] == every], before


def test_recorded_statistics_are_those_of_the_inspected_step(tmp_path: Path) -> None:
    model, rows, before = _steps(tmp_path, every=2)
    params = {r["tensor"]: r for r in rows if r["kind"] == "param"}
    assert set(params) == {n for n, _ in model.named_parameters()}
    for name, value in before.items():  # the parameters the step's gradients were taken at
        assert params[name]["norm"] == pytest.approx(value.norm().item(), rel=1e-5)
    grads = {r["tensor"]: r for r in rows if r["kind"] == "grad"}
    assert set(grads) == set(params) and all(r["norm"] > 0 for r in grads.values())
    acts = {r["layer"]: r for r in rows if r["kind"] == "activation"}
    assert set(acts) == {"0", "2", "3"}
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
        hidden = model[0](x)
    assert acts["0"]["max"] == pytest.approx(hidden.max().item(), rel=1e-5)
    assert sorted({r["step"] for r in read_rows(tmp_path)}) == [2, 4]


def test_inspecting_time_is_added_to_the_next_windows_overhead_share(tmp_path: Path) -> None:
    model = _model()
    inspector = Inspector(InspectConfig(every=3), tmp_path)
    state = State(model=model, run_dir=str(tmp_path))
    dispatcher = Dispatcher([inspector])
    engine = Engine(model, build_optimizer(model, 1e-2), dispatcher=dispatcher, state=state)
    dispatcher.fire(Event.FIT_START, state)
    batch = (torch.randn(16, 4), torch.ones(16, 1))
    for _ in range(2):  # steps that do not inspect take no time of the inspector's
        dispatcher.fire(Event.BATCH_START, state, batch)
        engine.step(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        state.step += 1
    assert inspector.busy_s == 0.0
    dispatcher.fire(Event.BATCH_START, state, batch)
    engine.step(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    state.step += 1
    spent = inspector.busy_s
    assert spent > 0
    # a window of the 3 steps at 0.5 s a step: the inspector's share of its 1.5 s is added
    record = {"step": 3, "redline/overhead_pct": 1.0, "step_time_s": 0.5}
    dispatcher.fire(Event.WINDOW, state, record)
    assert record["redline/overhead_pct"] == pytest.approx(1.0 + 100 * spent / 1.5)
    assert inspector.busy_s == 0.0  # charged once
    record = {"step": 6, "redline/overhead_pct": 1.0, "step_time_s": 0.5}
    dispatcher.fire(Event.WINDOW, state, record)
    assert record["redline/overhead_pct"] == 1.0


def test_pandas_reads_every_inspection_in_one_call(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    _steps(tmp_path, every=1, steps=3)
    frame = pd.read_parquet(tmp_path / "stats" / "layers")
    assert sorted(frame["step"].unique()) == [1, 2, 3]
    assert {"layer", "kind", *STAT_NAMES, "amax"} <= set(frame.columns)


def test_snapshots_are_safetensors_of_every_selected_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _model()
    inspector = Inspector(InspectConfig(every=0, snapshot_every=1, layers=("^0$",)), tmp_path)
    state = State(model=model, run_dir=str(tmp_path))
    dispatcher = Dispatcher([inspector])
    engine = Engine(model, build_optimizer(model, 1e-2), dispatcher=dispatcher, state=state)
    dispatcher.fire(Event.FIT_START, state)
    batch = (torch.randn(8, 4), torch.zeros(8, 1))
    dispatcher.fire(Event.BATCH_START, state, batch)
    engine.step(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    saved = load_file(tmp_path / "stats" / "snapshots" / "step-00000001.safetensors")
    assert set(saved) == {"param/0.weight", "param/0.bias", "grad/0.weight", "grad/0.bias",
                          "activation/0"}
    assert saved["activation/0"].shape == (8, 8)


def test_bad_inspect_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"inspect\.every"):
        load_config(None, ["inspect.every=-1"])
    with pytest.raises(ConfigError, match=r"inspect\.layers"):
        load_config(None, ["inspect.layers=['']"])


def test_a_training_run_writes_its_statistics_and_task_series(tmp_path: Path) -> None:
    from redline.task import resolve_task

    task = resolve_task(TOY)
    task.series = lambda model, batch: {"loss_parts": torch.tensor([1.0, 2.0]),
                                        "penalty": torch.tensor(0.5)}
    config = load_config(None, [f"task={TOY}", "train.steps=7", "inspect.every=3",
                                "telemetry.log_every=2", "train.eval_every=0"])
    Trainer(config, task=task, run_dir=tmp_path / "r", progress=False).fit()
    # every 3 steps, and the last: a run shorter than inspect.every still has its end state
    assert sorted({r["step"] for r in read_rows(tmp_path / "r")}) == [3, 6, 7]
    series = read_rows(tmp_path / "r", "series")
    assert [(r["step"], r["name"], r["index"], r["value"]) for r in series if r["step"] == 3] \
        == [(3, "loss_parts", 0, 1.0), (3, "loss_parts", 1, 2.0), (3, "penalty", 0, 0.5)]


def test_histograms_count_each_tensors_finite_values_in_equal_bins() -> None:
    from redline.stats import histograms

    t = torch.tensor([0.0, 0.1, 0.5, 0.99, 1.0, float("nan")])
    (counts,) = histograms([t], torch.tensor([0.0]), torch.tensor([1.0]), bins=4).tolist()
    assert counts == [2, 0, 1, 2]  # [0, .25) [.25, .5) [.5, .75) [.75, 1]; NaN not counted


def test_a_tensor_without_a_finite_range_gets_no_histogram(tmp_path: Path) -> None:
    published: list[tuple[int, list[dict]]] = []
    model = _model()
    inspector = Inspector(InspectConfig(every=1), tmp_path,
                          publish=lambda step, h: published.append((step, h)))
    state = State(model=model, run_dir=str(tmp_path))
    dispatcher = Dispatcher([inspector])
    engine = Engine(model, build_optimizer(model, 1e-2), dispatcher=dispatcher, state=state,
                    skip_nonfinite=True)
    dispatcher.fire(Event.FIT_START, state)
    batch = (torch.randn(8, 4), torch.zeros(8, 1))
    dispatcher.fire(Event.BATCH_START, state, batch)
    engine.step(batch, lambda m, b: m(b[0]).sum() * float("nan"))  # every gradient NaN
    state.step += 1
    dispatcher.fire(Event.WINDOW, state, {"step": 1})
    ((step, entries),) = published
    names = {e["name"] for e in entries}
    assert step == 1 and names == {f"param/{n}" for n, _ in model.named_parameters()}
    assert all(len(e["edges"]) == len(e["counts"]) + 1 for e in entries)


@pytest.mark.slow
def test_histograms_reach_tensorboard_and_wandb_when_they_are_on(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from redline.telemetry.wandb_reader import find_run_files, read_history

    config = load_config(None, [f"task={TOY}", "train.steps=4", "inspect.every=2",
                                "telemetry.log_every=2", "train.eval_every=0",
                                "telemetry.trackers=[jsonl,tensorboard,wandb]",
                                "telemetry.wandb_mode=offline"])
    Trainer(config, run_dir=tmp_path / "r", progress=False).fit()
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"),
                              size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()["histograms"]
    assert "grad/0.weight" in tags and "param/3.bias" in tags
    steps = [e.step for e in events.Histograms("grad/0.weight")]
    assert steps == [2, 4]
    rows = read_history(find_run_files(tmp_path / "r")[0])
    assert any(r.get("hist/grad/0.weight._type") == "histogram" for r in rows)
