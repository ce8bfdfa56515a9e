"""A real lightning.Trainer.fit with RedlineCallback writes a run directory redline reads,
right under gradient accumulation, clipping and precision (issue 19, observed case 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from redline.telemetry.jsonl import read_jsonl

from ..conftest import run_cli

L = pytest.importorskip("lightning")
pytestmark = pytest.mark.slow


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader(n: int = 512, batch: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x.sum(1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def test_a_lightning_run_writes_a_run_directory_doctor_and_report_read(tmp_path: Path) -> None:
    from redline.integrations.lightning import RedlineCallback

    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=15,
                        accumulate_grad_batches=2,
                        callbacks=[RedlineCallback(tmp_path / "run", log_every=5)])
    trainer.fit(Regressor(), _loader(), _loader(64))
    run = tmp_path / "run"
    windows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in windows] == [5, 10, 15, 20, 25, 30]
    assert all(r["effective_batch"] == 32 and r["samples_per_s"] > 0 for r in windows)
    assert all(r["redline/host_syncs"] == 0 for r in windows)
    assert all(0 <= r["data_wait_pct"] <= 100 for r in windows)  # validation is not in it
    assert windows[-1]["grad_norm"] > 0 and windows[-1]["mfu"] is not None
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    # every 15 batches = 7.5 optimizer steps at accumulate_grad_batches=2
    assert [r["step"] for r in evals] == [7, 15, 23]
    assert all(r["eval/loss"] > 0 for r in evals)
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "run_start" and "flops" in events and events[-1] == "run_end"
    doctor = run_cli(["doctor", str(run), "--json"], tmp_path)
    assert doctor.returncode == 0, doctor.stderr
    findings = json.loads(doctor.stdout.splitlines()[-1])["findings"]
    assert findings and not any(f["kind"] == "ended" for f in findings)
    report = run_cli(["report", str(run)], tmp_path)
    assert report.returncode == 0, report.stderr
    assert "gradient norm" in (run / "report.html").read_text()


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return _loader(512, self.batch_size)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return _loader(64, self.batch_size)


def test_find_batch_size_keeps_the_effective_batch_within_the_memory(tmp_path: Path) -> None:
    from redline.integrations.lightning import RedlineCallback, find_batch_size

    roomy = find_batch_size(Regressor(), Data(), effective_batch_size=256,
                            memory_budget="64MiB")
    tight = find_batch_size(Regressor(), Data(), effective_batch_size=256,
                            memory_budget="100KiB")
    for plan in (roomy, tight):
        assert plan.micro_batch * plan.accumulate_grad_batches == 256
        assert plan.micro_batch <= plan.max_fit
    assert tight.max_fit < roomy.max_fit and tight.micro_batch < 256
    data = Data(tight.micro_batch)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=tight.accumulate_grad_batches,
                        callbacks=[RedlineCallback(tmp_path / "run", log_every=2)])
    trainer.fit(Regressor(), data)
    windows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert {r["effective_batch"] for r in windows} == {256}


# ---- under accumulation, clipping and precision (issue 19, observed case 4) ----------------


class Logged(Regressor):
    """Logs its loss with self.log(on_step=True) and the pre-clip gradient norm."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        loss = super().training_step(batch, idx)
        self.log("train_loss", loss, on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.log("norm", grad_norm(self, norm_type=2)["grad_2.0_norm_total"])


class Probe(L.Callback):
    """What Lightning itself logged: each micro-batch's `train_loss`, by optimizer step,
    and each step's pre-clip norm."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}
        self.norms: dict[int, float] = {}

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        self._step = trainer.global_step + 1

    def on_train_batch_end(self, trainer: Any, module: Any, out: Any, batch: Any,
                           idx: int) -> None:
        logged = trainer.logged_metrics
        self.losses.setdefault(self._step, []).append(float(logged["train_loss"]))
        if trainer.global_step == self._step:
            self.norms[self._step] = float(logged["norm"])


def _slow_collate(items: list[Any]) -> Any:
    time.sleep(0.005)  # a loader that makes training wait: data_wait_pct is well above 0
    return torch.utils.data.default_collate(items)


def _fit(run: Path, accumulate: int, precision: str = "32-true", steps: int = 6,
         **callback: Any) -> tuple[Probe, torch.utils.data.DataLoader]:
    from redline.integrations.lightning import RedlineCallback

    torch.manual_seed(0)
    loader = _loader(512, 8)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8,
                                         collate_fn=_slow_collate)
    probe = Probe()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=accumulate, precision=precision,
                        gradient_clip_val=0.01,
                        callbacks=[RedlineCallback(run, log_every=2, **callback), probe])
    trainer.fit(Logged(), loader)
    return probe, loader


def _micro_batch_flops(batch: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        Regressor().training_step(batch, 0).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(("accumulate", "precision"),
                         [(1, "32-true"), (2, "32-true"), (4, "bf16-mixed")])
def test_the_callback_records_what_lightning_logs_under_accumulation(
        tmp_path: Path, accumulate: int, precision: str) -> None:
    run = tmp_path / "run"
    probe, loader = _fit(run, accumulate, precision)
    rows = read_jsonl(run / "metrics.jsonl")
    windows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in windows] == [2, 4, 6]
    for r in windows:  # the step's loss: its micro-batches' undivided losses, averaged
        steps = (r["step"] - 1, r["step"])
        assert all(len(probe.losses[s]) == accumulate for s in steps)
        expected = sum(sum(probe.losses[s]) / accumulate for s in steps) / 2
        assert r["loss"] == pytest.approx(expected, rel=1e-4)
        assert r["grad_norm"] == pytest.approx(probe.norms[r["step"]], rel=1e-4)  # pre-clip
        assert r["grad_norm"] > 0.05  # clipping to 0.01 did not reach the norm recorded
        assert 0 < r["data_wait_pct"] <= 100
    logged = [r for r in rows if "lightning/train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(r["lightning/train_loss"] == pytest.approx(probe.losses[r["step"]][-1])
               for r in logged)
    assert not any("lightning/epoch" in r for r in rows)
    flops = next(e for e in read_jsonl(run / "events.jsonl") if e["event"] == "flops")
    assert flops["flops_per_step"] == accumulate * _micro_batch_flops(next(iter(loader)))
    config = yaml.safe_load((run / "config.yaml").read_text())
    name = {"32-true": "fp32", "bf16-mixed": "bf16-mixed"}[precision]
    assert config["framework"] == {**config["framework"], "name": "lightning",
                                   "accumulate": accumulate, "precision": precision}
    assert config["precision"]["name"] == name
    assert config["train"] == {"batch_size": 8, "effective_batch_size": 8 * accumulate}
    if accumulate == 4:
        doctor = run_cli(["doctor", str(run)], tmp_path)
        assert doctor.returncode == 0, doctor.stderr
        assert "no precision.name" not in doctor.stdout + doctor.stderr


def test_inspect_every_writes_per_layer_statistics(tmp_path: Path) -> None:
    from redline.inspector import read_rows

    _fit(tmp_path / "run", 2, steps=4, inspect_every=2)
    rows = read_rows(tmp_path / "run")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    kinds = {(r["layer"], r["kind"]) for r in rows}
    assert {("net.0", "param"), ("net.0", "grad"), ("net.2", "activation")} <= kinds
