"""What build_job builds for the layout and compile settings, through its public API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.job.build import build_job

CPU = DeviceInfo.detect("cpu")


class ConvTask:
    name = "conv"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 8 * 8, 1))

    def train_data(self) -> TensorDataset:
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 1))

    def eval_data(self) -> None:
        return None

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])


def _config(**precision: object) -> RunConfig:
    return RunConfig(task="conv").updated({"train.batch_size": 8, **{
        f"precision.{k}": v for k, v in precision.items()}})


def test_channels_last_lays_out_convolution_weights_nhwc_and_trains() -> None:
    job = build_job(_config(channels_last=True), ConvTask(), CPU)
    conv = job.model[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # NCHW no longer: the layout really changed
    x, y = next(iter(job.train_loader()))
    assert torch.isfinite(job.engine.step((x, y), ConvTask().loss))
    plain = build_job(_config(), ConvTask(), CPU)
    assert plain.model[0].weight.is_contiguous()
    assert job.fingerprint() != plain.fingerprint()  # a cached batch search tells them apart


def test_compile_with_a_cpu_memory_budget_is_refused_with_the_reason() -> None:
    config = _config(compile=True).updated({"memory.budget": "1GiB"})
    with pytest.raises(ConfigError, match=r"torch\.compile cannot trace"):
        build_job(config, ConvTask(), CPU)


@pytest.mark.slow
def test_a_compiled_cpu_run_compiles(tmp_path: Path) -> None:
    """Two dispatch modes met a compiled model's first call on a CPU and made dynamo skip
    its forward for good (nothing was compiled, silently): the OOM guard's first-step
    memory check, and the trainer's FLOP count. A compiled run must really compile."""
    from torch._dynamo.utils import counters

    from redline.run.trainer import Trainer

    counters.clear()
    job = build_job(_config(compile=True), ConvTask(), CPU)
    assert job.memory_limit is None  # no tracked first step for a compiled model
    config = _config(compile=True).updated({"train.steps": 3, "train.eval_every": 0,
                                            "train.samples": 0})
    result = Trainer(config, task=ConvTask(), run_dir=tmp_path / "run", progress=False).fit()
    assert result.steps == 3
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
