from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from redline.device import DeviceInfo
from redline.memory.probe import (
    MemoryBudget,
    MemoryTracker,
    device_free_and_total,
    format_size,
    live_tensor_bytes,
    measure_peak,
    parse_size,
)

CPU = DeviceInfo(kind="cpu", index=None, name="cpu", memory_total=64 * 2**30)
OOM_PREFIX = "DefaultCPUAllocator: can't allocate memory"


def _mlp(width: int = 256, depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int, width: int,
                seq: int = 16) -> None:
    # A sequence dimension makes activations, not Adam's parameter-sized temporaries, the
    # peak at every batch size tried: the regime where memory(b) = a + k*b holds.
    x = torch.randn(batch, seq, width)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---- sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
    ("300MB", 300_000_000), ("64KiB", 65536), ("1024", 1024), (4096, 4096),
    (" 2 gib ", 2 * 2**30), ("8G", 8 * 2**30), ("100B", 100), ("0.5KiB", 512),
])
def test_parse_size_forms(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_none_passes_through() -> None:
    assert parse_size(None) is None


@pytest.mark.parametrize("bad", ["lots", "", "12 parsecs", "-1GiB", "GiB", -5, True, "nan"])
def test_parse_size_errors_name_the_value_and_forms(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"memory\.budget must be a size like 2GiB") as info:
        parse_size(bad)
    assert repr(bad) in str(info.value)


def test_parse_size_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^eval\.memory must be"):
        parse_size("lots", name="eval.memory")


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (256 * 2**20, "256 MiB"),
    (2 * 2**30, "2.00 GiB"), (3 * 2**40, "3.00 TiB"), (-1536, "-1.50 KiB"),
    (300 * 2**20, "300 MiB"), (int(12.5 * 2**20), "12.5 MiB"), (2**30 - 1, "1.00 GiB"),
    (1023 * 2**20, "1023 MiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


# ---- live_tensor_bytes --------------------------------------------------------------------

def test_live_tensor_bytes_dedups_shared_storages() -> None:
    t = torch.zeros(100)
    assert live_tensor_bytes(t, t[10:], t.view(10, 10), [t, {"a": (t,)}]) == 400
    assert live_tensor_bytes(t, torch.zeros(50, dtype=torch.float64)) == 800
    tied = nn.Linear(10, 10, bias=False)
    pair = nn.ModuleList([tied, tied])
    assert live_tensor_bytes(pair) == 400


def test_live_tensor_bytes_counts_grads_buffers_and_adam_state() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.BatchNorm1d(50))
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    opt = torch.optim.Adam(model.parameters())
    assert live_tensor_bytes(model, opt) == params + buffers
    model(torch.randn(8, 100)).sum().backward()
    assert live_tensor_bytes(model, opt) == 2 * params + buffers
    opt.step()
    # Adam keeps exp_avg and exp_avg_sq per parameter, plus a scalar `step` tensor each.
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert live_tensor_bytes(model, opt) == 4 * params + buffers + steps
    assert live_tensor_bytes(opt) == 2 * params + steps


# ---- the tracker --------------------------------------------------------------------------

def test_tracker_counts_a_known_allocation_and_its_free() -> None:
    tracker = MemoryTracker(baseline=1000)
    with tracker:
        x = torch.empty(1000)
        assert tracker.current == 1000 + 4000
        del x
    assert tracker.current == 1000
    assert tracker.peak == 5000
    tracker.reset_peak()
    assert tracker.peak == 1000


def test_views_count_once_and_the_storage_lives_until_the_last_view() -> None:
    tracker = MemoryTracker()
    with tracker:
        x = torch.empty(100, 10)
        views = [x[3:], x.t(), x.view(-1), x.unsqueeze(0).expand(3, 100, 10), x.detach()]
        views += list(x.split(25))
        assert tracker.current == 4000
        del x
        assert tracker.current == 4000  # the views keep the storage alive
        del views
        assert tracker.current == 0


def test_storages_older_than_the_tracker_are_not_counted() -> None:
    old = torch.zeros(1000)
    tracker = MemoryTracker()
    with tracker:
        old.add_(1)
        view = old[:10]
        old.mul_(2)
        assert tracker.current == 0
        del view


def test_aliases_the_schema_does_not_declare_and_meta_tensors_are_not_counted() -> None:
    old = torch.zeros(1000)
    tracker = MemoryTracker()
    with tracker:
        views = [torch.ops.aten._unsafe_view(old, [10, 100]), *torch.unsafe_split(old, 100)]
        blank = torch.empty(0).set_(old.untyped_storage())
        meta = torch.empty(10**9, device="meta")
        assert tracker.current == 0
        fresh = torch.ops.aten._unsafe_view(torch.empty(10), [2, 5])
        assert tracker.current == 40
        del views, blank, meta, fresh
    assert tracker.current == 0


def test_resize_growth_is_counted() -> None:
    tracker = MemoryTracker()
    with tracker:
        x = torch.empty(0)
        x.resize_(100)
        assert tracker.current == 400
        x.resize_(1000)
        assert tracker.current == 4000
        out = torch.empty(0)
        torch.add(torch.ones(10), 1, out=out)  # the ones(10) temporary dies at once
        assert tracker.current == 4000 + 40
        del x, out
    assert tracker.current == 0


def test_storage_saved_for_backward_lives_until_backward() -> None:
    a = torch.randn(1000, requires_grad=True)
    tracker = MemoryTracker()
    with tracker:
        b = a * 2            # saved by sin's backward
        c = b.sin()
        del b
        assert tracker.current == 8000  # b survives in the graph, c is live
        c.sum().backward()
        after = tracker.current
        del c
    # b is freed with the graph; a.grad (4000 bytes, allocated inside) is still live
    assert after == 4000 + 4000
    assert tracker.current == 4000
    a.grad = None
    assert tracker.current == 0


def test_tracker_sees_backward_allocations() -> None:
    width = 256
    model = _mlp(width)
    x = torch.randn(64, width)
    forward_only = MemoryTracker()
    with torch.no_grad(), forward_only:
        model(x).sum()
    full = MemoryTracker()
    with full:
        model(x).sum().backward()
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert full.peak > forward_only.peak + grads // 2
    assert full.current == grads  # the grads outlive the step; activations are gone


def test_nested_entry_is_counted_not_stacked() -> None:
    tracker = MemoryTracker()
    with tracker, tracker:
        x = torch.empty(10)
        with tracker:
            y = torch.empty(10)
        assert tracker.current == 80
        del x, y
    assert tracker.current == 0


def test_frees_on_another_thread_are_counted() -> None:
    tracker = MemoryTracker()
    box: list[torch.Tensor] = []
    with tracker:
        box.extend(torch.empty(1000) for _ in range(50))
    assert tracker.current == 50 * 4000
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert tracker.current == 0


def test_set_baseline_rebases_without_double_counting() -> None:
    tracker = MemoryTracker(baseline=100)
    with tracker:
        x = torch.empty(1000)
        tracker.set_baseline(10_000)       # taken to include x
        assert tracker.current == 10_000
        del x                               # part of the baseline now: not subtracted again
        assert tracker.current == 10_000
        y = torch.empty(10)
        assert tracker.current == 10_040
        del y
    assert tracker.peak == 10_040


# ---- the budget ---------------------------------------------------------------------------

def test_budget_raises_a_genuine_oom_and_releases_the_memory() -> None:
    tracker = MemoryTracker(budget=100_000, baseline=10_000)
    with tracker:
        keep = torch.empty(10_000)  # 40 KB: fits
        before = tracker.current
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(20_000)     # 80 KB more: does not
        assert isinstance(info.value, torch.OutOfMemoryError)
        assert str(info.value).startswith(f"{OOM_PREFIX}: you tried to allocate 80000 bytes")
        assert "redline CPU memory budget" in str(info.value)
        del info
        gc.collect()
        assert tracker.current == before
        assert tracker.peak <= 100_000
        del keep


def test_budget_oom_in_backward_propagates_as_oom() -> None:
    model = _mlp(128)
    x = torch.randn(256, 128)
    params = live_tensor_bytes(model)
    with MemoryTracker(baseline=params) as probe_tracker:
        model(x).sum()  # no backward: the forward alone
    forward_peak = probe_tracker.peak
    budget = MemoryBudget(forward_peak + 4096, CPU, baseline=params)
    assert budget.tracker is not None
    with budget, pytest.raises(torch.OutOfMemoryError, match=f"^{OOM_PREFIX}"):
        model(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    assert budget.tracker.current == params


def test_training_step_peak_grows_linearly_with_batch() -> None:
    width = 64
    model = _mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train_step(model, opt, 4, width)  # Adam state exists from here on
    base = live_tensor_bytes(model, opt)

    def peak(batch: int) -> int:
        stats = measure_peak(lambda: _train_step(model, opt, batch, width), CPU, baseline=base)
        assert stats.peak_bytes >= stats.baseline_bytes == base
        return stats.peak_bytes

    sizes = [8, 16, 32]
    peaks = [peak(b) for b in sizes]
    mean_b, mean_p = sum(sizes) / 3, sum(peaks) / 3
    k = sum((b - mean_b) * (p - mean_p) for b, p in zip(sizes, peaks, strict=True)) / sum(
        (b - mean_b) ** 2 for b in sizes
    )
    a = mean_p - k * mean_b
    assert k > 0
    actual = peak(64)
    assert abs(a + k * 64 - actual) / actual < 0.15
    # Also on the step's own bytes (the baseline can hide a poor fit) ...
    assert abs(a + k * 64 - actual) / (actual - base) < 0.15
    # ... which are mostly per-sample here, so the fit is tested, not the intercept.
    assert k * 64 > 0.5 * (actual - base)


def test_measure_peak_cpu() -> None:
    stats = measure_peak(lambda: torch.empty(1000), CPU, baseline=123)
    assert stats.peak_bytes == 123 + 4000
    assert stats.baseline_bytes == 123
    assert stats.total_bytes == CPU.memory_total
    with MemoryBudget(2**20, CPU):
        assert measure_peak(lambda: None, CPU).total_bytes == 2**20  # the budget is the total


def test_device_free_and_total_cpu() -> None:
    assert device_free_and_total(CPU) == (None, CPU.memory_total)


def test_memory_budget_routes_cuda_to_the_allocator_fraction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = DeviceInfo(kind="cuda", index=0, name="x", memory_total=8 * 2**30, capability=(8, 0),
                     supports_bf16=True, supports_tf32=True)
    calls: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append((fraction, device)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda device=None: 1.0, raising=False)
    budget = MemoryBudget(parse_size("2GiB") or 0, gpu)
    assert budget.tracker is None
    with budget:
        assert calls == [(0.25, torch.device("cuda", 0))]
    assert calls[-1] == (1.0, torch.device("cuda", 0))
    assert len(calls) == 2


def test_unsupported_devices_and_budgets_are_refused() -> None:
    mps = DeviceInfo(kind="mps", index=None, name="mps", memory_total=None)
    with pytest.raises(ValueError, match="cpu and cuda"):
        MemoryBudget(2**30, mps)
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0, CPU)
    with pytest.raises(ValueError, match="positive"):
        MemoryTracker(budget=-1)


def test_the_tracker_hears_fsdp_gather_and_free_its_parameters_in_place(
        tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        for layer in model:
            fully_shard(layer)  # a 1-rank shard is the whole layer
        fully_shard(model)
        layer = (256 * 256 + 256) * 4
        with MemoryTracker() as tracker:
            model(torch.randn(1, 256)).sum().backward()
        gc.collect()
        # what is left is the two layers' gradients: the gathered copies were freed in
        # place (unheard, they stayed counted: 4 layers' worth)
        assert tracker.current == 2 * layer
        assert tracker.peak >= 3 * layer  # a gathered layer beside the gradients
    finally:
        dist.destroy_process_group()
