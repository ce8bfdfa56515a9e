"""fp8 through torchao: which layers convert and why, the emulation trains on CPU, and the
real thing is refused where the device cannot run it."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from redline import fp8
from redline.device import DeviceInfo
from redline.errors import MissingExtra
from redline.precision import PrecisionConfig, PrecisionError, get_precision

CPU = DeviceInfo.detect("cpu")
ADA = DeviceInfo(kind="cuda", index=0, name="NVIDIA L4", memory_total=24 << 30,
                 capability=(8, 9), supports_bf16=True, supports_tf32=True, supports_fp8=True)
AMPERE = DeviceInfo(kind="cuda", index=0, name="NVIDIA A100", memory_total=40 << 30,
                    capability=(8, 0), supports_bf16=True, supports_tf32=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 16, 3),        # not a Linear
        nn.Flatten(), nn.Linear(16 * 30, 64),  # the first Linear
        nn.Linear(64, 128), nn.GELU(),         # converted
        nn.Linear(128, 40),                    # 40 is not a multiple of 16
        nn.Linear(40, 32),                     # in_features 40 likewise
        nn.Linear(32, 32),                     # tiny: 1024 weights
        nn.Linear(32, 16),                     # the last Linear
    )


def test_the_plan_names_a_reason_for_every_layer_it_keeps() -> None:
    decisions = {d.name: d for d in fp8.plan(_model(), "tensorwise", min_numel=4096)}
    assert [n for n, d in decisions.items() if d.converted] == ["3"]
    assert "nn.Linear only" in decisions["0"].reason
    assert "first Linear" in decisions["2"].reason
    assert "out_features 40 not a multiple of 16" in decisions["5"].reason
    assert "in_features 40" in decisions["6"].reason
    assert "tiny matmul: 1024 weights" in decisions["7"].reason
    assert "last Linear" in decisions["8"].reason
    kept = fp8.plan(_model(), "rowwise", keep_first_last=False, min_numel=0)
    assert [d.name for d in kept if d.converted] == ["2", "3", "7", "8"]
    assert "rowwise" in next(d for d in kept if d.converted).reason


@pytest.mark.slow
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_emulated_converts_the_planned_layers_and_trains_on_cpu(recipe: str) -> None:
    policy = get_precision("fp8-emulated", CPU, PrecisionConfig(name="fp8-emulated",
                                                                fp8_recipe=recipe))
    model = policy.convert_module(_model())
    converted = [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted == ["3"]
    assert [d["name"] for d in policy.layer_plan if d["converted"]] == converted
    assert policy.describe()["emulated"] is True and policy.emulated
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 32), torch.randn(8, 16)
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        with policy.forward_context():
            loss = nn.functional.mse_loss(model(x), y)
        policy.backward(loss)
        policy.optimizer_step(optimizer)
        first = first if first is not None else loss.item()
    assert torch.isfinite(loss) and loss.item() < first


def test_fp8_emulated_rounds_like_fp8() -> None:
    """Its numerics differ from fp32's by fp8's rounding: the emulation is really on."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    x = torch.randn(32, 64)
    exact = layer(x)
    policy = get_precision("fp8-emulated", CPU,
                           PrecisionConfig(name="fp8-emulated", fp8_keep_first_last=False,
                                           fp8_min_numel=0))
    rounded = policy.convert_module(layer)(x)
    rel = ((rounded - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.2


def test_fp8_is_refused_with_the_reason_where_the_device_cannot_run_it() -> None:
    with pytest.raises(PrecisionError, match=r"CUDA GPU of compute capability 8\.9.*fp8-emulated"):
        get_precision("fp8", CPU)
    with pytest.raises(PrecisionError, match=r"has \(8, 0\)"):
        get_precision("fp8", AMPERE)
    assert get_precision("fp8", ADA).compute_dtype_name == "float8"


def test_a_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(MissingExtra, match=r"redline\[fp8\]"):
        get_precision("fp8-emulated", CPU)
