"""A real transformers.Trainer.train with RedlineCallback writes a run directory redline reads
(a small GPT-2 built from a config: nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from redline.telemetry.jsonl import read_jsonl

from ..conftest import run_cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_an_hf_trainer_run_writes_a_run_directory_doctor_and_report_read(tmp_path: Path) -> None:
    from redline.integrations.transformers import RedlineCallback

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64,
                                     n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=10,
        eval_strategy="steps", eval_steps=10, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(512),
                                   eval_dataset=Tokens(32),
                                   callbacks=[RedlineCallback(tmp_path / "run", log_every=5)])
    trainer.train()
    run = tmp_path / "run"
    windows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in windows] == [5, 10, 15, 20]
    assert all(r["effective_batch"] == 16 and r["redline/host_syncs"] == 0 for r in windows)
    assert windows[-1]["loss"] < windows[0]["loss"] and windows[-1]["grad_norm"] > 0
    assert windows[-1]["mfu"] is not None
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "run_start" and events[-1] == "run_end"
    doctor = run_cli(["doctor", str(run), "--json"], tmp_path)
    assert doctor.returncode == 0, doctor.stderr
    assert not any(f["kind"] == "ended"
                   for f in json.loads(doctor.stdout.splitlines()[-1])["findings"])
    assert run_cli(["report", str(run)], tmp_path).returncode == 0
