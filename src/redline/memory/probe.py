"""Peak memory of a step, on CUDA and on CPU, and a memory budget that raises a real OOM.

CUDA has the caching allocator's statistics (`max_memory_allocated`, `mem_get_info`).
CPU has nothing comparable, so `MemoryTracker` (tracker.py) counts for itself: a
TorchDispatchMode that adds the bytes of each new storage an op returns and subtracts
them when the storage dies.

On a CPU without `memory.budget` there is still a limit: the memory the machine has free.
Past it Linux does not fail the allocation (it overcommits) but lets the kernel's OOM
killer end the process, and an out-of-memory error that is never raised cannot be
recovered from. So the batch search and the OOM guard work against `default_budget`: a
share of the memory available when the run starts, with room for what the storage
tracker does not see (allocator overhead, scratch space: it counted ~20-25 % less than
the process's resident memory grew by, measured on sr3-tiny).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from redline.device import DeviceInfo
from redline.errors import ConfigError
from redline.memory.sizes import format_size, live_tensor_bytes, parse_size
from redline.memory.tracker import MemoryTracker

# The size helpers (sizes.py) and the tracker (tracker.py) stay importable from here, the
# memory API's home.
__all__ = ["AVAILABLE_SHARE", "MemoryBudget", "MemoryStats", "MemoryTracker",
           "available_memory", "default_budget", "device_free_and_total", "format_size",
           "live_tensor_bytes", "measure_peak", "parse_size"]

# Of the memory available at start, the share a CPU run without memory.budget may fill as
# the tracker counts it: x1.25 for what it does not see is still under what is free.
AVAILABLE_SHARE = 0.75


@dataclass
class MemoryStats:
    """What one measured call needed."""

    peak_bytes: int          # peak during the measured function (baseline included)
    baseline_bytes: int      # live before it (CPU: the bytes given; CUDA: memory_allocated())
    total_bytes: int | None  # device total (CUDA) or the budget / physical RAM (CPU)


class _Active(threading.local):
    def __init__(self) -> None:
        self.budgets: list[MemoryBudget] = []  # entered on this thread, innermost last


_active = _Active()


def _require_cpu_or_cuda(device: DeviceInfo) -> None:
    if device.kind not in ("cpu", "cuda"):
        raise ValueError(
            f"memory probing supports cpu and cuda devices, not {device.kind!r}: "
            "the CPU tracker would not see this device's tensors"
        )


def _cpu_total(device: DeviceInfo) -> int | None:
    # Inside a CPU budget, the budget is the memory there is; otherwise physical RAM.
    for budget in reversed(_active.budgets):
        if not budget.device.is_cuda:
            return budget.budget
    return device.memory_total


def measure_peak(fn: Callable[[], Any], device: DeviceInfo, baseline: int = 0) -> MemoryStats:
    """Run `fn` once and report its peak memory.

    CUDA: the caching allocator's peak between two synchronizations (everything allocated
    on the device counts, so `baseline` is ignored and `memory_allocated()` reported).
    CPU: a `MemoryTracker(baseline=baseline)` around `fn`; pass the bytes already live
    (`live_tensor_bytes(model, optimizer)`), since the tracker sees only new storages.
    """
    _require_cpu_or_cuda(device)
    if device.is_cuda:
        dev = device.torch_device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        total = device.memory_total or torch.cuda.mem_get_info(dev)[1]
        return MemoryStats(torch.cuda.max_memory_allocated(dev), before, total)
    tracker = MemoryTracker(baseline=baseline)
    with tracker:
        fn()
    return MemoryStats(tracker.peak, baseline, _cpu_total(device))


def device_free_and_total(device: DeviceInfo) -> tuple[int | None, int | None]:
    """(free, total) bytes: the driver's view on CUDA; (None, physical RAM) on CPU."""
    if device.is_cuda:
        free, total = torch.cuda.mem_get_info(device.torch_device)
        return int(free), int(total)
    return None, device.memory_total


class MemoryBudget:
    """Context manager enforcing `budget` bytes for the code inside it.

    CPU: a `MemoryTracker(budget, baseline)` is active inside (every op tracked, ~1.4-2x
    slower: an emulation for tests and for "what would fit a smaller card"). CUDA: the caching
    allocator is capped with `set_per_process_memory_fraction(budget / total)`, restored on
    exit; the allocator then raises its own OOM, and `baseline` is not needed.
    """

    def __init__(self, budget: int, device: DeviceInfo, baseline: int = 0) -> None:
        _require_cpu_or_cuda(device)
        if budget <= 0:
            raise ValueError(f"memory budget must be a positive number of bytes, got {budget!r}")
        self.budget = budget
        self.device = device
        self.baseline = baseline
        self.tracker: MemoryTracker | None = (
            None if device.is_cuda else MemoryTracker(budget, baseline)
        )
        self._old_fraction: float | None = None

    def __enter__(self) -> MemoryBudget:
        if self.tracker is not None:
            self.tracker.__enter__()
        else:
            dev = self.device.torch_device
            total = self.device.memory_total or torch.cuda.mem_get_info(dev)[1]
            # The getter is recent; without it the cap is taken to be unset (1.0).
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            self._old_fraction = float(getter(dev)) if getter is not None else None
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget / total), dev)
        _active.budgets.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _active.budgets.remove(self)
        if self.tracker is not None:
            self.tracker.__exit__(*exc_info)
        else:
            fraction = 1.0 if self._old_fraction is None else self._old_fraction
            torch.cuda.set_per_process_memory_fraction(fraction, self.device.torch_device)


def available_memory() -> int | None:
    """Bytes the machine can give this process now without swapping (psutil), or None."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def default_budget(device: DeviceInfo, sharing: int = 1) -> tuple[int, str]:
    """(bytes, where they come from, in words) when memory.budget is not set.

    CUDA: the device's memory (its allocator raises a real OOM past it). CPU: a share of the
    memory available now (see the module docstring), split between the `sharing`
    processes that train on this host (torchrun's ranks on one machine). Elsewhere:
    unknown, so ConfigError.
    """
    if device.is_cuda and device.memory_total:
        return device.memory_total, f"the {format_size(device.memory_total)} of {device.name}"
    if device.kind == "cpu":
        free = available_memory()
        if free is not None:
            ranks = f", shared by {sharing} ranks" if sharing > 1 else ""
            return int(AVAILABLE_SHARE * free / sharing), (
                f"{AVAILABLE_SHARE:.0%} of the {format_size(free)} of memory available "
                f"now{ranks}")
    raise ConfigError(f"the memory of {device.name} is unknown; set memory.budget")
