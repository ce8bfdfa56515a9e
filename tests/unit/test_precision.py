from __future__ import annotations

import pytest
import torch
from torch import nn

from redline.device import DeviceInfo
from redline.precision import PRECISIONS, BF16True, PrecisionError, get_precision

CPU = DeviceInfo.detect("cpu")
VOLTA = DeviceInfo(kind="cuda", index=0, name="Tesla V100-SXM2-16GB", memory_total=16 * 2**30,
                   capability=(7, 0), supports_bf16=False, supports_tf32=False)
AMPERE = DeviceInfo(kind="cuda", index=0, name="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30,
                    capability=(8, 0), supports_bf16=True, supports_tf32=True)


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(PrecisionError) as e:
        get_precision("fp12", CPU)
    for name in PRECISIONS:
        assert name in str(e.value)


def test_refused_not_substituted() -> None:
    with pytest.raises(PrecisionError, match=r"tf32.*CUDA"):
        get_precision("tf32", CPU)
    with pytest.raises(PrecisionError, match=r"bf16-mixed.*\(7, 0\)"):
        get_precision("bf16-mixed", VOLTA)
    with pytest.raises(PrecisionError, match=r"capability 8\.0"):
        get_precision("tf32", VOLTA)


def test_routing_on_a_hand_made_gpu() -> None:
    # Construction only: no CUDA call happens until a step runs.
    for name in ("fp32", "tf32", "bf16-mixed", "bf16-true"):
        assert get_precision(name, AMPERE).name == name
    assert get_precision("tf32", AMPERE).compute_dtype_name == "tf32"
    assert get_precision("bf16-mixed", AMPERE).compute_dtype_name == "bfloat16"


def test_fp32_pins_highest_and_restores_flags() -> None:
    torch.set_float32_matmul_precision("medium")
    try:
        with get_precision("fp32", CPU).global_context():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_flags_restored_after_an_exception() -> None:
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError), get_precision("fp32", CPU).global_context():
        raise RuntimeError("boom")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize(("name", "dtype"), [("bf16-mixed", torch.bfloat16),
                                              ("fp16-mixed", torch.float16)])
def test_autocast_policies_compute_in_their_dtype(name: str, dtype: torch.dtype) -> None:
    policy = get_precision(name, CPU)
    layer = nn.Linear(4, 4)
    with policy.forward_context():
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype
    assert layer.weight.dtype == torch.float32  # weights stay fp32 in mixed precision


def test_bf16_true_casts_the_model() -> None:
    policy = get_precision("bf16-true", CPU)
    assert isinstance(policy, BF16True)
    model = policy.convert_module(nn.Linear(4, 4))
    assert model.weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 4)).dtype == torch.bfloat16  # float32 inputs are cast
    assert list(model.state_dict()) == ["weight", "bias"]
    assert policy.describe()["param_dtype"] == "bfloat16"


def test_fp16_scaler_state_round_trips() -> None:
    a = get_precision("fp16-mixed", CPU)
    a.scaler.scale(torch.ones(()))  # the scaler allocates its scale lazily
    a.scaler.update(new_scale=1024.0)
    b = get_precision("fp16-mixed", CPU)
    b.load_state_dict(a.state_dict())
    assert b.scaler.get_scale() == 1024.0


@pytest.mark.slow
def test_flags_when_the_process_uses_the_new_fp32_precision_api() -> None:
    # A process that set the new per-backend flags cannot read the legacy ones; the policy
    # must then speak the new API and still pin IEEE fp32.
    code = (
        "import torch\n"
        "from redline.device import DeviceInfo\n"
        "from redline.precision import get_precision\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'\n"
        "with get_precision('fp32', DeviceInfo.detect('cpu')).global_context():\n"
        "    assert torch.backends.mkldnn.matmul.fp32_precision == 'ieee'\n"
        "assert torch.backends.mkldnn.matmul.fp32_precision == 'bf16'\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_scaler_watch_judges_a_full_window_by_share() -> None:
    from redline.precision import ScalerWatch

    watch = ScalerWatch(window=4, share=0.5)
    assert [watch.add(s) for s in (True, True, True)] == [False] * 3  # not full yet
    assert watch.add(False) is True and watch.overflowing  # 3 of 4 > half: warn
    assert watch.add(False) is False and not watch.overflowing  # 2 of 4: not more than half
    assert [watch.add(True) for _ in range(3)] == [False] * 3  # over again: warned once
    assert watch.overflowing and watch.run == 3
