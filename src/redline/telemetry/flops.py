"""FLOPs per step, the peak they are divided by, and MFU = achieved FLOP/s ÷ peak.

FLOPs are counted once, not per step: for fixed shapes a step's FLOPs are constant, and
`FlopCounterMode` intercepts every op in Python, which would cost more than the step. They
are counted before any `torch.compile`, because the counter sees the eager ops; a compiled
graph hides them (or triggers a recompile inside the counter). The count runs on a copy
whose parameters and buffers are fake tensors (`FakeTensorMode`): shapes, dtypes and
devices propagate, nothing is computed or allocated, and the real model is never touched.
Only when that fails (data-dependent control flow, `.item()`, boolean-mask indexing) do
we run one real forward+backward on a deep copy, under `fork_rng` so the training run's
random stream is the same as if nothing had been counted.

MFU is left empty (None) rather than guessed whenever the denominator is not known: an
unknown GPU, or fp8, whose runs keep some layers in bf16 so no single dense peak is right.
A wrong peak gives a confident, wrong MFU that people then compare across runs; an empty
cell says "not known". On CPU, where no vendor table applies, the "peak" is a short
measured matmul rate in the compute dtype, labelled "measured" wherever it is logged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from redline import batch as batch_tree
from redline._torch_compat import fake_tensor_mode
from redline.device import DeviceInfo, float32_matmul
from redline.errors import StorageError
from redline.files import atomic_write_text

LossFn = Callable[[nn.Module, Any], Tensor]


class StepFlops(NamedTuple):
    """A FLOP count and how it was obtained: "fake" (nothing computed) or "real" (one step)."""

    total: int
    method: Literal["fake", "real"]


def count_step_flops(model: nn.Module, batch: Any, loss_fn: LossFn) -> int | None:
    """FLOPs of one forward+backward of `loss_fn(model, batch)`, or None if not countable."""
    counted = measure_step_flops(model, batch, loss_fn)
    return counted.total if counted is not None else None


def measure_step_flops(model: nn.Module, batch: Any, loss_fn: LossFn) -> StepFlops | None:
    """Like `count_step_flops`, also saying which path counted. Never touches `model`.

    A count of 0 is returned as None: the counter knows matmuls, convolutions and
    attention only, so 0 means "ops it cannot count" (an LSTM, an embedding-only model),
    and an MFU of 0 would be a guess dressed up as a measurement.
    """
    counted: StepFlops | None = None
    try:
        counted = StepFlops(_count_fake(model, batch, loss_fn), "fake")
    except Exception:  # fake tensors cannot follow this model/loss: count one real step
        try:
            counted = StepFlops(_count_real(model, batch, loss_fn), "real")
        except Exception:
            return None
    return counted if counted.total > 0 else None


def _count_fake(model: nn.Module, batch: Any, loss_fn: LossFn) -> int:
    # plain tensor attributes (not registered as buffers) are turned fake on first use
    # instead of failing the count
    mode = fake_tensor_mode()
    # Pre-seeding deepcopy's memo with fake parameters/buffers means no real storage (and
    # no .grad) is copied: the copy costs what the module objects cost, not the weights.
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        memo[id(tensor)] = mode.from_tensor(tensor)
    shadow = copy.deepcopy(model, memo)
    fake_batch = batch_tree.map_tensors(batch, mode.from_tensor)
    with _rng_preserved(model), mode, FlopCounterMode(display=False) as counter:
        loss_fn(shadow, fake_batch).backward()
    return int(counter.get_total_flops())


def _count_real(model: nn.Module, batch: Any, loss_fn: LossFn) -> int:
    shadow = copy.deepcopy(model)  # its own parameters, grads and BatchNorm statistics
    try:
        with _rng_preserved(model), FlopCounterMode(display=False) as counter:
            loss_fn(shadow, batch).backward()
        return int(counter.get_total_flops())
    finally:
        shadow.zero_grad(set_to_none=True)  # free the copy's gradients at once
        del shadow


@contextmanager
def _rng_preserved(model: nn.Module) -> Iterator[None]:
    # Fork the CPU generator and those of the CUDA devices the model lives on (naming the
    # devices avoids fork_rng's warning and touching every GPU).
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def analytic_transformer_flops(n_params: int, tokens: int, n_layers: int = 0,
                               seq_len: int = 0, d_model: int = 0) -> int:
    """Training FLOPs (forward+backward) of a decoder transformer for `tokens` tokens.

    6·N·T + 12·L·T·S·d (PaLM, appendix B; Chinchilla). 6·N·T is the weight matmuls:
    2 FLOPs per multiply-add, forward once and backward twice (input and weight grads).
    12·L·T·S·d is attention's QKᵀ and AV (2 matmuls · 2 FLOPs · 3 passes = 12 per layer,
    per token, per context position, per model dimension), counted over the full S×S
    square as PaLM does, even though a causal mask makes half of it redundant. N should
    be the parameters used in matmuls: leave out an untied embedding table (a lookup).
    Omit L, S, d to get the 6·N·T approximation.
    """
    return 6 * n_params * tokens + 12 * n_layers * tokens * seq_len * d_model


def mfu(flops_per_step: int | None, step_time_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: (FLOPs per step / step time) / peak FLOP/s; None if unknown."""
    if flops_per_step is None or peak is None or peak <= 0 or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak


def peak_flops(device: DeviceInfo, compute_dtype: str, override: float | None = None,
               cache_dir: Path | None = None) -> tuple[float | None, str]:
    """(dense peak FLOP/s, source) with source "override", "table", "measured" or "unknown"."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override!r}")
        return float(override), "override"
    if compute_dtype.startswith("float8"):
        return None, "unknown"
    table = device.peak_for(compute_dtype)
    if table is not None:
        return table, "table"
    if device.kind == "cpu":
        dtype = _CPU_DTYPES.get(compute_dtype)
        if dtype is not None:
            return _cached_cpu_peak(device, dtype, cache_dir), "measured"
    return None, "unknown"


# CPUs have no TF32: a tf32 request is measured (and run) as IEEE float32.
_CPU_DTYPES = {"float32": torch.float32, "tf32": torch.float32,
               "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cached_cpu_peak(device: DeviceInfo, dtype: torch.dtype, cache_dir: Path | None) -> float:
    key = {"cpu": device.name, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch.")}
    folder = cache_dir or Path(os.environ.get("REDLINE_CACHE_DIR")
                               or Path.home() / ".cache" / "redline")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"cpu-peak-{key['dtype']}-{digest}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("flops", 0) > 0:
            return float(cached["flops"])
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or unreadable: measure
    flops = measure_cpu_matmul_flops(device, dtype)
    with contextlib.suppress(StorageError):  # unwritable: a re-measurement next time
        atomic_write_text(path, json.dumps({"key": key, "flops": flops,
                                            "measured_at": time.time()}), "FLOP/s cache")
    return flops


def measure_cpu_matmul_flops(device: DeviceInfo, dtype: torch.dtype,
                             budget_s: float = 0.5) -> float:
    """Best square-matmul FLOP/s in `dtype` on this CPU's torch threads, within ~budget_s.

    The size grows from 512 until one matmul takes ~50 ms (at most 2048), so a dtype the
    CPU has no fast kernels for (fp16 without AMX-FP16 runs at ~1 GFLOP/s) stays within
    budget while fast dtypes get matrices big enough to approach their peak.
    """
    gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG is untouched
    deadline = time.perf_counter() + budget_s
    # fp32 pins "highest": on AMX CPUs the default may silently compute fp32 in bf16.
    with float32_matmul("highest"), torch.inference_mode():
        n, best = 512, 0.0  # below 512 a matmul sits in cache and overstates the rate
        while True:  # two timings per size while growing (the first warms the kernels)
            a = torch.rand(n, n, generator=gen).to(dtype)
            b = torch.rand(n, n, generator=gen).to(dtype)
            fastest = min(_time_mm(a, b), _time_mm(a, b))
            best = max(best, 2 * n**3 / fastest)
            # Two matmuls at 2n cost ~16x one at n: stop growing if they would overrun.
            if n >= 2048 or fastest > 0.05 or time.perf_counter() + 16 * fastest > deadline:
                break
            n *= 2
        for _ in range(8):  # the rest of the budget: best of several at the largest size
            if time.perf_counter() >= deadline:
                break
            best = max(best, 2 * n**3 / _time_mm(a, b))
    return best


def _time_mm(a: Tensor, b: Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return max(time.perf_counter() - start, 1e-9)
