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

What is counted: matmuls, convolutions and attention, as torch's `FlopCounterMode` counts
them (2 FLOPs per multiply-add), with formulas added for the attention kernels it lacks
(CPU flash attention among them: telemetry/sdpa_flops.py), so every scaled-dot-product
kernel a training step can run is counted. Not counted: activations, norms, losses and
embedding lookups (a small share of a model built on matmuls), and inference-only fused
layers (nn.MultiheadAttention's fast path, never taken in training mode), packed
variable-length and nested-tensor attention (`torch.nn.attention.varlen`'s
`_cudnn_attention_*`, whose FLOPs depend on the packed lengths) and torch's experimental
Triton attention kernels.

Model FLOPs, the numerator of MFU by its usual definition (PaLM, appendix B), are the
FLOPs the model needs, not those the device ran: recomputation is left out. Activation
checkpointing (`torch.utils.checkpoint`) reruns forwards during backward, and fused
attention kernels rerun QKᵀ in their backward; `StepFlopCounter` counts what ran and
keeps the recomputed part apart. The step's FLOPs that ran, recomputation included, give
hardware FLOPs utilisation (HFU), reported beside MFU where it differs.

Why the recomputed FLOPs are measured and subtracted, rather than avoided: bypassing
checkpointing while counting would mean patching a function that models import by name
and frameworks wrap; "forward × 3" is wrong wherever a backward skips a matmul (frozen
layers, inputs that need no gradient); and what reruns is not simply "the forward" (a
non-reentrant checkpoint stops once the tensors backward needs are back; selective
checkpointing reruns some ops only). Counting what ran and labelling the reruns is exact
in each case and gives HFU from the same pass.

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
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from redline import batch as batch_tree
from redline._torch_compat import fake_tensor_mode
from redline.device import DeviceInfo, float32_matmul
from redline.errors import StorageError
from redline.files import atomic_write_text
from redline.telemetry import sdpa_flops

LossFn = Callable[[nn.Module, Any], Tensor]


class StepFlops(NamedTuple):
    """A step's FLOP count and how it was obtained: "fake" (nothing computed) or "real".

    `total` is model FLOPs (recomputation left out: MFU's numerator); `hardware` is what
    the device ran, recomputation included (HFU's), equal to `total` when nothing reran.
    """

    total: int
    method: Literal["fake", "real"]
    hardware: int


class StepFlopCounter:
    """A `FlopCounterMode` that knows every attention kernel and keeps recomputation apart.

        with StepFlopCounter() as counter:
            loss_fn(model, batch).backward()
        counter.model_flops, counter.hardware_flops

    Recomputed are the ops that run inside the backward pass with gradients enabled from
    `torch.utils.checkpoint`'s code (its reruns of the forward; the backward's own kernels
    run with gradients disabled), and the QKᵀ a fused attention backward recomputes
    (telemetry/sdpa_flops.py). A hand-written autograd.Function that recomputes on its own
    is not recognised: its recomputation counts as model FLOPs.
    """

    def __init__(self) -> None:
        self.recomputed = 0
        splits = sdpa_flops.recomputing_backwards()
        formulas = {**sdpa_flops.attention_formulas(), **flop_counter.flop_registry}
        mapping = {op: self._tallied(f, splits.get(op)) for op, f in formulas.items()}
        self._mode = FlopCounterMode(display=False, custom_mapping=mapping)

    def _tallied(self, formula: Callable[..., int],
                 split: tuple[int, int] | None) -> Callable[..., int]:
        def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = int(formula(*args, out_val=out_val, **kwargs))
            if _recomputing():
                self.recomputed += flops
            elif split is not None:
                part, whole = sdpa_flops.recomputed_share(split, args)
                self.recomputed += flops * part // whole
            return flops

        count._get_raw = True  # type: ignore[attr-defined]  # called with the op's tensors
        return count

    def __enter__(self) -> StepFlopCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    @property
    def hardware_flops(self) -> int:
        """FLOPs the device ran, recomputation included."""
        return int(self._mode.get_total_flops())

    @property
    def model_flops(self) -> int:
        """FLOPs the model needs: recomputation left out."""
        return self.hardware_flops - self.recomputed

    def get_total_flops(self) -> int:
        """`FlopCounterMode`'s name, for a drop-in: the model FLOPs."""
        return self.model_flops


# torch.utils.checkpoint's source, as its frames name it (the suffix: a venv can move)
_CHECKPOINT_FILE = os.path.join("torch", "utils", Path(torch_checkpoint.__file__).name)


# -1 outside a backward pass (what torch.utils.checkpoint itself asks); a torch without it
# would count recomputation as model FLOPs, which the checkpointing tests catch.
_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _recomputing() -> bool:
    # The autograd engine runs backward kernels with grad mode off (create_graph=False);
    # checkpoint reruns the forward under enable_grad. Grad mode on inside a backward
    # alone would also match a loss that differentiates with create_graph=True (a gradient
    # penalty), hence the check that checkpoint's code is the caller.
    if _graph_task_id() == -1 or not torch.is_grad_enabled():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def count_step_flops(model: nn.Module, batch: Any, loss_fn: LossFn) -> int | None:
    """Model FLOPs of one forward+backward of `loss_fn(model, batch)` (recomputation left
    out), or None if not countable."""
    counted = measure_step_flops(model, batch, loss_fn)
    return counted.total if counted is not None else None


def measure_step_flops(model: nn.Module, batch: Any, loss_fn: LossFn,
                       device: torch.device | None = None) -> StepFlops | None:
    """Like `count_step_flops`, also giving hardware FLOPs and which path counted. Never
    touches `model`. A model built on the meta device (an FSDP-sharded model's unsharded
    twin: run/setup.py) is counted on fake tensors on `device` (default: the CPU); it has
    no values to run a real step with, so only the fake path can count it.

    A count of 0 is returned as None: the counter knows matmuls, convolutions and
    attention only, so 0 means "ops it cannot count" (an LSTM, an embedding-only model),
    and an MFU of 0 would be a guess dressed up as a measurement.
    """
    counted: StepFlops | None = None
    try:
        total, hardware = _count_fake(model, batch, loss_fn, device or torch.device("cpu"))
        counted = StepFlops(total, "fake", hardware)
    except Exception:  # fake tensors cannot follow this model/loss: count one real step
        if any(t.is_meta for t in model.parameters()):
            return None
        try:
            total, hardware = _count_real(model, batch, loss_fn)
            counted = StepFlops(total, "real", hardware)
        except Exception:
            return None
    return counted if counted.total > 0 else None


def _count_fake(model: nn.Module, batch: Any, loss_fn: LossFn, device: torch.device
                ) -> tuple[int, int]:
    # plain tensor attributes (not registered as buffers) are turned fake on first use
    # instead of failing the count
    mode = fake_tensor_mode()
    # Pre-seeding deepcopy's memo with fake parameters/buffers means no real storage (and
    # no .grad) is copied: the copy costs what the module objects cost, not the weights.
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        memo[id(tensor)] = _fake(mode, tensor, device)
    shadow = copy.deepcopy(model, memo)
    fake_batch = batch_tree.map_tensors(batch, mode.from_tensor)
    with _rng_preserved(model), mode, StepFlopCounter() as counter:
        loss_fn(shadow, fake_batch).backward()
    return counter.model_flops, counter.hardware_flops


def _fake(mode: Any, tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` as a fake tensor; a meta tensor as one on `device` (shapes alone)."""
    if not tensor.is_meta:
        return mode.from_tensor(tensor)
    with mode:
        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                   device=device)
    fake = fake.requires_grad_(tensor.requires_grad)
    return nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
        else fake


def _count_real(model: nn.Module, batch: Any, loss_fn: LossFn) -> tuple[int, int]:
    shadow = copy.deepcopy(model)  # its own parameters, grads and BatchNorm statistics
    try:
        with _rng_preserved(model), StepFlopCounter() as counter:
            loss_fn(shadow, batch).backward()
        return counter.model_flops, counter.hardware_flops
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
