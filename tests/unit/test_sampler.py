"""The system sampler: records on its own thread, prompt stop, notes instead of errors."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections import Counter
from typing import Any

import pytest

from redline.device import DeviceInfo
from redline.telemetry.sampler import NO_NVML, NO_PSUTIL, NvmlReader, Sampler

CPU = DeviceInfo(kind="cpu", index=None, name="test cpu", memory_total=2**30)
GPU = DeviceInfo(kind="cuda", index=0, name="NVIDIA H100 80GB HBM3", memory_total=80 * 2**30)


def _wait_for(records: list[Any], n: int, timeout: float = 60.0) -> None:
    # the timeout tells a stopped sampler from a loaded machine; it returns once n arrive
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(records) >= n, f"only {len(records)} records in {timeout}s"


def test_publishes_cpu_ram_rss_from_its_own_thread() -> None:
    records: list[dict[str, Any]] = []
    threads: set[str] = set()

    def publish(record: dict[str, Any]) -> None:
        threads.add(threading.current_thread().name)
        records.append(record)

    with Sampler(CPU, publish, every_s=0.05, slow_every_s=0.2) as sampler:
        _wait_for(records, 3)
    assert threads == {"redline-sampler"}  # nothing ran on the calling (training) thread
    for rec in records:
        assert abs(rec["time"] - time.time()) < 60
        assert 0.0 <= rec["cpu/util_pct"] <= 100.0
        assert 0.0 < rec["ram/used_pct"] <= 100.0
        assert rec["proc/rss_bytes"] > 10 * 2**20  # this Python process with torch loaded
        assert not any(k.startswith("gpu/") for k in rec)
    assert sampler.notes == ["no GPU: GPU metrics are off (device is cpu)"]


def test_stop_is_prompt_even_with_a_long_period() -> None:
    # stop() waits at most its timeout for the thread, far less than the hour-long period:
    # a thread left alive means it slept out its period instead of waking at stop
    sampler = Sampler(CPU, lambda r: None, every_s=3600.0, slow_every_s=3600.0).start()
    sampler.stop(timeout=30.0)
    assert sampler._thread is not None and not sampler._thread.is_alive()


def test_no_nvml_gives_one_note_and_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    records: list[dict[str, Any]] = []
    with Sampler(GPU, records.append, every_s=0.05) as sampler:
        _wait_for(records, 2)
    assert sampler.notes == [NO_NVML]
    assert all(not k.startswith("gpu/") for rec in records for k in rec)
    assert "cpu/util_pct" in records[0]


def test_no_psutil_gives_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)
    records: list[dict[str, Any]] = []
    with Sampler(CPU, records.append, every_s=0.02) as sampler:
        time.sleep(0.1)
    assert NO_PSUTIL in sampler.notes
    assert records == []  # nothing to sample on a CPU device without psutil: no empty records


class FakeNvml(types.ModuleType):
    """Stands in for pynvml; counts calls and records any attribute it does not define."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, power_error: bool = False) -> None:
        super().__init__("pynvml")
        self.calls: Counter[str] = Counter()
        self.power_error = power_error

    def __getattr__(self, name: str) -> Any:  # only reached for names not defined here
        if not name.startswith("__"):  # dunders: import machinery and pytest probing
            self.__dict__.setdefault("unexpected", []).append(name)
        raise AttributeError(name)

    def _call(self, name: str) -> None:
        self.calls[name] += 1

    def nvmlInit(self) -> None:
        self._call("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call("nvmlDeviceGetHandleByIndex")
        return f"handle{index}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        self._call("processes")
        return []

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: str) -> list[Any]:
        self._call("processes")
        return []

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        assert handle == "handle0"
        self._call("util")
        return types.SimpleNamespace(gpu=87, memory=41)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        self._call("mem")
        return types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30, free=50 * 2**30)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 64

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if self.power_error:
            raise RuntimeError("Not Supported")
        return 312_456  # milliwatts

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return 1980


def test_fake_nvml_init_once_cached_handle_units(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    records: list[dict[str, Any]] = []
    with Sampler(GPU, records.append, every_s=0.02, slow_every_s=0.5) as sampler:
        _wait_for(records, 12)
    assert sampler.notes == []
    assert fake.calls["nvmlInit"] == 1 and fake.calls["nvmlShutdown"] == 1
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 1  # cached, not looked up per tick
    assert fake.calls["processes"] == 0 and "unexpected" not in fake.__dict__
    assert all(rec["gpu/util_pct"] == 87.0 and rec["gpu/mem_util_pct"] == 41.0
               for rec in records)
    slow = [rec for rec in records if "gpu/power_w" in rec]
    assert slow[0] is records[0]  # the first record carries everything
    assert 1 <= len(slow) < len(records) and fake.calls["mem"] < fake.calls["util"]
    assert slow[0]["gpu/power_w"] == pytest.approx(312.456)  # mW -> W
    assert slow[0]["gpu/mem_used_bytes"] == 30 * 2**30
    assert slow[0]["gpu/mem_total_bytes"] == 80 * 2**30
    assert slow[0]["gpu/temp_c"] == 64.0 and slow[0]["gpu/sm_clock_mhz"] == 1980.0


def test_visible_devices_map_torch_index_to_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    reader, why = NvmlReader.open(1)
    assert why is None and reader is not None
    assert reader._handle == "handle1"
    reader, _ = NvmlReader.open(0)
    assert reader is not None and reader._handle == "handle3"


def test_unsupported_metric_is_noted_once_and_not_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(power_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    reader, why = NvmlReader.open(0)
    assert reader is not None and why is None
    first, second = reader.slow(), reader.slow()
    assert "gpu/power_w" not in first and "gpu/power_w" not in second
    assert first["gpu/temp_c"] == 64.0
    assert len(reader.notes) == 1 and "gpu/power_w" in reader.notes[0]
    reader.close()
    assert fake.calls["nvmlShutdown"] == 1


def test_a_failing_publish_is_noted_and_sampling_goes_on() -> None:
    calls: list[int] = []

    def publish(record: dict[str, Any]) -> None:
        calls.append(1)
        raise RuntimeError("hub closed")

    with Sampler(CPU, publish, every_s=0.02) as sampler:
        _wait_for(calls, 3)
    assert sum("publish failed" in n for n in sampler.notes) == 1
