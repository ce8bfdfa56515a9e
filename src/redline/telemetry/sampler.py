"""The system sampler: a daemon thread that reads NVML and psutil at per-metric cadences.

It runs in the telemetry writer process (see hub.py), not in the training process: a
Python thread there would take the GIL from the training thread between its ops. It
reads the training process by pid, and the GPU by the UUID the training process gives
it. Each tick publishes one record, {"time": ..., metric: value, ...}, to a callback.

Cadence follows how fast each metric moves and what reading it costs: utilisation and
CPU/RAM/RSS every `every_s`; GPU memory, temperature, power and SM clock (which drift over
seconds, and some of which are slow NVML queries) every `slow_every_s`.

NVML is initialised once and the device handle cached: per-tick `nvmlInit` or handle
look-ups cost milliseconds, and process enumeration (`nvmlDeviceGetComputeRunningProcesses`)
is never called: it is slow, needs privileges in containers and is not what we report.
A missing package, driver or GPU turns GPU metrics off with one note, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from redline.telemetry import schema as K

Record = dict[str, Any]


class SampledDevice(Protocol):
    """What the sampler needs of a device (a DeviceInfo, or the writer process's copy)."""

    kind: str
    index: int | None

    @property
    def is_cuda(self) -> bool: ...

NO_NVML = "no NVML: GPU metrics are off (pip install nvidia-ml-py, and an NVIDIA driver)"
NO_PSUTIL = "no psutil: CPU, RAM and RSS metrics are off (pip install psutil)"


class NvmlReader:
    """One GPU through NVML: `open` initialises once; `fast()`/`slow()` read cached handles."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle
        self.notes: list[str] = []
        self._broken: set[str] = set()  # metrics this GPU does not support: not retried

    @classmethod
    def open(cls, index: int, uuid: str | None = None
             ) -> tuple[NvmlReader | None, str | None]:
        """(reader, None), or (None, why) when NVML or the GPU is not there."""
        try:
            import pynvml  # lazily: CPU-only installs never import it
        except ImportError:
            return None, NO_NVML
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return None, f"{NO_NVML}: {exc}"
        try:
            return cls(pynvml, _handle_for(pynvml, index, uuid)), None
        except Exception as exc:
            _quiet(pynvml.nvmlShutdown)
            return None, f"no NVML handle for GPU {index}: GPU metrics are off ({exc})"

    def fast(self) -> Record:
        util = self._read(K.GPU_UTIL, self._nvml.nvmlDeviceGetUtilizationRates)
        if util is None:
            return {}
        return {K.GPU_UTIL: float(util.gpu), K.GPU_MEM_UTIL: float(util.memory)}

    def slow(self) -> Record:
        nvml, out = self._nvml, {}
        mem = self._read(K.GPU_MEM_USED, nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:  # device-wide: includes CUDA contexts and other processes
            out[K.GPU_MEM_USED] = int(mem.used)
            out[K.GPU_MEM_TOTAL] = int(mem.total)
        temp = self._read(K.GPU_TEMP, nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        if temp is not None:
            out[K.GPU_TEMP] = float(temp)
        power = self._read(K.GPU_POWER, nvml.nvmlDeviceGetPowerUsage)
        if power is not None:
            out[K.GPU_POWER] = power / 1000.0  # NVML reports milliwatts
        clock = self._read(K.GPU_CLOCK, nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        if clock is not None:
            out[K.GPU_CLOCK] = float(clock)
        return out

    def close(self) -> None:
        _quiet(self._nvml.nvmlShutdown)

    def _read(self, metric: str, fn: Callable[..., Any], *args: Any) -> Any:
        if metric in self._broken:
            return None
        try:
            return fn(self._handle, *args)
        except Exception as exc:  # e.g. power on GPUs without a sensor: note once, stop asking
            self._broken.add(metric)
            self.notes.append(f"NVML cannot read {metric} on this GPU ({exc}); it is off")
            return None


def _handle_for(nvml: Any, index: int, uuid: str | None = None) -> Any:
    # torch's index counts CUDA_VISIBLE_DEVICES in CUDA order; NVML counts every GPU in PCI
    # order. The UUID names the same board in both; the index is the last resort.
    uuid = uuid or torch_gpu_uuid(index)
    if uuid:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if index < len(visible) and visible[index]:
        if visible[index].isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
        if visible[index].startswith("GPU-"):
            return nvml.nvmlDeviceGetHandleByUUID(visible[index])
    return nvml.nvmlDeviceGetHandleByIndex(index)


def torch_gpu_uuid(index: int) -> str | None:
    """The GPU's UUID from torch, where this process has already initialised CUDA (the
    trainer passes it to the writer process, whose NVML reader finds the GPU by it)."""
    torch = sys.modules.get("torch")  # never imported here: the writer process has none
    if torch is None:
        return None
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return f"GPU-{uuid}" if uuid else None
    except Exception:
        return None


def _quiet(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        fn()


class Sampler:
    """Daemon thread publishing {"time", metrics...} records; `notes` says what is off."""

    def __init__(self, device: SampledDevice, publish: Callable[[Record], None],
                 every_s: float = 2.0, slow_every_s: float = 10.0, *,
                 pid: int | None = None, gpu_uuid: str | None = None) -> None:
        if every_s <= 0 or slow_every_s <= 0:
            raise ValueError("sampler cadences must be positive")
        self.device = device
        self.pid, self.gpu_uuid = pid, gpu_uuid  # None: this process, the UUID from torch
        self.every_s = every_s
        self.slow_every_s = slow_every_s
        self._publish = publish
        self._notes: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def notes(self) -> list[str]:
        """Why some metrics are off (no NVML, no psutil, unsupported sensor). Complete once
        `start()` has returned, except per-metric notes, which appear on first failure."""
        return list(self._notes)

    def start(self, wait_s: float = 5.0) -> Sampler:
        """Start the thread; wait up to `wait_s` for its set-up so `notes` is filled in."""
        if self._thread is not None:
            raise RuntimeError("Sampler.start() called twice")
        self._thread = threading.Thread(target=self._run, name="redline-sampler", daemon=True)
        self._thread.start()
        self._ready.wait(wait_s)  # NVML init can take a moment; never forever
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            gpu, proc, psutil = self._setup()
        finally:
            self._ready.set()  # start() must never wait out its timeout on a set-up error
        try:
            # cpu_percent's first reading (at set-up) is meaningless, so the first record is
            # one period in; it carries the slow metrics too.
            next_fast, next_slow = time.monotonic() + self.every_s, 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_fast:
                    record: Record = {K.TIME: time.time()}
                    self._sample(record, gpu, psutil, proc, slow=now >= next_slow)
                    if now >= next_slow:
                        next_slow = now + self.slow_every_s
                    next_fast = now + self.every_s
                    if len(record) > 1:
                        self._emit(record)
                self._stop.wait(max(0.0, next_fast - time.monotonic()))
            # A last sample at stop: a run shorter than one period still gets a record.
            record = {K.TIME: time.time()}
            self._sample(record, gpu, psutil, proc, slow=True)
            if len(record) > 1:
                self._emit(record)
        finally:
            if gpu is not None:
                gpu.close()

    def _setup(self) -> tuple[NvmlReader | None, Any, Any]:
        gpu = None
        if self.device.is_cuda:
            gpu, why = NvmlReader.open(self.device.index or 0, self.gpu_uuid)
            if why:
                self._notes.append(why)
        else:
            self._notes.append(f"no GPU: GPU metrics are off (device is {self.device.kind})")
        try:
            import psutil

            proc = psutil.Process(self.pid)
            psutil.cpu_percent(interval=None)  # primes the counter; the first call returns 0.0
            return gpu, proc, psutil
        except ImportError:
            self._notes.append(NO_PSUTIL)
        except Exception as exc:  # psutil present but unusable (e.g. no /proc in a sandbox)
            self._notes.append(f"psutil failed: CPU, RAM and RSS metrics are off ({exc})")
        return gpu, None, None

    def _sample(self, record: Record, gpu: NvmlReader | None, psutil: Any, proc: Any,
                slow: bool) -> None:
        try:
            if psutil is not None:
                record[K.CPU_UTIL] = float(psutil.cpu_percent(interval=None))
                record[K.RAM_USED] = float(psutil.virtual_memory().percent)
                record[K.PROC_RSS] = int(proc.memory_info().rss)
            if gpu is not None:
                record.update(gpu.fast())
                if slow:
                    record.update(gpu.slow())
                if gpu.notes:  # per-metric NVML failures, surfaced as sampler notes
                    self._notes.extend(gpu.notes)
                    gpu.notes.clear()
        except Exception as exc:  # a sampling bug must not kill the thread silently
            self._note_once(f"system sampler: {type(exc).__name__}: {exc}")

    def _emit(self, record: Record) -> None:
        try:
            self._publish(record)
        except Exception as exc:  # e.g. the hub already closed: keep sampling, say so once
            self._note_once(f"system sampler: publish failed: {type(exc).__name__}: {exc}")

    def _note_once(self, note: str) -> None:
        if note not in self._notes:
            self._notes.append(note)
