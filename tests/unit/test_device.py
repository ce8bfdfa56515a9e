from __future__ import annotations

import pytest
import torch

from redline.device import PEAK_FLOPS, DeviceInfo, lookup_peak_flops


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


def test_every_table_entry_is_reachable_by_its_own_name() -> None:
    """Substring matching picks the first key found in the name, so a key must come
    before any shorter key contained in it ("h100 pcie" before "h100"): otherwise the
    longer one's entry could never be reached and its GPUs would get another's peak."""
    for i, (key, table) in enumerate(PEAK_FLOPS):
        assert lookup_peak_flops(f"NVIDIA {key.upper()} 80GB") == table, key
        later = [k for k, _ in PEAK_FLOPS[i + 1:] if key in k]
        assert not later, f"{later} can never match: {key!r} comes first"
    assert lookup_peak_flops("Some Future GPU") == {}


def test_table_peaks_are_ordered_as_the_hardware_is() -> None:
    """Tensor-core dtypes are never slower than fp32 on the same part (a data-sheet typo,
    e.g. a missing digit, would break it), and fp8 doubles bf16 where listed (data
    sheets round, e.g. L40S: 362 and 733)."""
    for key, table in PEAK_FLOPS:
        for dtype in ("tf32", "bfloat16", "float16"):
            if dtype in table:
                assert table[dtype] >= table["float32"], (key, dtype)
        if "float8" in table:
            assert table["float8"] == pytest.approx(2 * table["bfloat16"], rel=0.02), key
