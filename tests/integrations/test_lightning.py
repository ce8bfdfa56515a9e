"""A real lightning.Trainer.fit with RedlineCallback writes a run directory redline reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

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
