"""A real transformers.Trainer.train with RedlineCallback writes a run directory redline reads
(a small GPT-2 built from a config: nothing downloaded), right under gradient accumulation,
clipping and precision (issue 19, observed case 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

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


# ---- under accumulation, clipping and precision (issue 19, observed case 4) ----------------


def _slow_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    time.sleep(0.005)  # a loader that makes training wait: data_wait_pct is well above 0
    return transformers.default_data_collator(items)


def _gpt2() -> Any:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64,
                                     n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _train(tmp_path: Path, accumulate: int, steps: int = 6, **callback: Any) -> Any:
    from redline.integrations.transformers import RedlineCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate, learning_rate=1e-3, logging_steps=2,
        max_grad_norm=0.01, eval_strategy="steps", eval_steps=3, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(
        model=_gpt2(), args=args, train_dataset=Tokens(256), eval_dataset=Tokens(8),
        data_collator=_slow_collate,
        callbacks=[RedlineCallback(tmp_path / "run", log_every=2, **callback)])
    trainer.train()
    return trainer


def _micro_batch_flops() -> int:
    batch = _slow_collate([Tokens(4)[i] for i in range(4)])
    with FlopCounterMode(display=False) as counter:
        _gpt2()(**batch).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_the_callback_records_what_the_trainer_logs_under_accumulation(
        tmp_path: Path, accumulate: int) -> None:
    trainer = _train(tmp_path, accumulate)
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    windows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in windows] == [2, 4, 6]
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    for r in windows:  # logging_steps == log_every: the same steps averaged
        assert r["loss"] == pytest.approx(logged[r["step"]]["loss"], rel=1e-4)
        # the pre-clip norm, as the Trainer logs it (clipping to 0.01 does not reach it)
        assert r["grad_norm"] == pytest.approx(logged[r["step"]]["grad_norm"], rel=1e-4)
        assert r["grad_norm"] > 0.05
        assert 0 < r["data_wait_pct"] <= 100
    own = [r for r in rows if "hf/loss" in r]
    assert [r["hf/loss"] for r in own] == [logged[s]["loss"] for s in (2, 4, 6)]
    assert all("hf/learning_rate" in r for r in own)
    assert not any(k in r for r in rows for k in ("hf/epoch", "eval/epoch"))
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    flops = next(e for e in read_jsonl(run / "events.jsonl") if e["event"] == "flops")
    assert flops["flops_per_step"] == accumulate * _micro_batch_flops()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["framework"] == {**config["framework"], "name": "transformers",
                                   "accumulate": accumulate, "precision": "fp32"}
    assert config["precision"]["name"] == "fp32"
    assert config["train"] == {"batch_size": 4, "effective_batch_size": 4 * accumulate}


def test_inspect_every_writes_per_layer_statistics(tmp_path: Path) -> None:
    from redline.inspector import read_rows

    _train(tmp_path, 2, steps=4, inspect_every=2)
    rows = read_rows(tmp_path / "run")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert {"param", "grad", "activation"} <= {r["kind"] for r in rows}
