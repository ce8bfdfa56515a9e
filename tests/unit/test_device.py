from __future__ import annotations

import pytest
import torch

from redline.device import DeviceInfo, lookup_peak_flops


def test_cpu_detection() -> None:
    info = DeviceInfo.detect("cpu")
    assert info.kind == "cpu" and info.torch_device == torch.device("cpu")
    assert info.supports_bf16 and not info.supports_tf32 and not info.supports_fp8
    assert info.peak_for("bfloat16") is None  # unknown: MFU stays empty, never guessed
    assert info.to_dict()["kind"] == "cpu"


def test_auto_picks_cpu_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert DeviceInfo.detect("auto").kind == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu:0"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        DeviceInfo.detect(spec)


def test_cuda_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        DeviceInfo.detect("cuda")


def test_peak_flops_table() -> None:
    sxm = lookup_peak_flops("NVIDIA H100 80GB HBM3")
    pcie = lookup_peak_flops("NVIDIA H100 PCIe")
    assert sxm["bfloat16"] == pytest.approx(989e12)
    assert pcie["bfloat16"] < sxm["bfloat16"]  # the more specific entry wins
    assert lookup_peak_flops("NVIDIA A100-SXM4-40GB")["tf32"] == pytest.approx(156e12)
    assert lookup_peak_flops("Some Future GPU") == {}
