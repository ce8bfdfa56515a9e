"""What the hardware can do: one DeviceInfo per device, and nothing CUDA-specific elsewhere.

Every capability question the rest of redline asks (does this device run bf16? fp8? how
much memory? what is the dense peak for this dtype?) is answered here, so CUDA-only
branches stay thin and tests can route them with a hand-made DeviceInfo. So is the one
global switch of how the device computes float32 matmuls (`float32_matmul`), which the
precision policies and the CPU peak measurement both set.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from redline.errors import UserError

# Dense (no sparsity) peak FLOP/s per compute dtype, from the vendors' data sheets.
# Keys are matched as case-insensitive substrings of torch.cuda.get_device_name(),
# most specific first. fp8 is listed for capability routing; MFU stays empty for fp8.
_T = 1e12
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"float32": 67 * _T, "tf32": 494.5 * _T, "bfloat16": 989 * _T,
              "float16": 989 * _T, "float8": 1979 * _T}),
    ("h100 pcie", {"float32": 51 * _T, "tf32": 378 * _T, "bfloat16": 756 * _T,
                   "float16": 756 * _T, "float8": 1513 * _T}),
    ("h100", {"float32": 67 * _T, "tf32": 494.5 * _T, "bfloat16": 989 * _T,
              "float16": 989 * _T, "float8": 1979 * _T}),
    ("a100", {"float32": 19.5 * _T, "tf32": 156 * _T, "bfloat16": 312 * _T,
              "float16": 312 * _T}),
    ("l40s", {"float32": 91.6 * _T, "tf32": 183 * _T, "bfloat16": 362 * _T,
              "float16": 362 * _T, "float8": 733 * _T}),
    ("l4", {"float32": 30.3 * _T, "tf32": 60 * _T, "bfloat16": 121 * _T,
            "float16": 121 * _T, "float8": 242 * _T}),
    ("a10g", {"float32": 31.2 * _T, "tf32": 62.5 * _T, "bfloat16": 125 * _T,
              "float16": 125 * _T}),
    ("rtx 4090", {"float32": 82.6 * _T, "tf32": 82.6 * _T, "bfloat16": 165 * _T,
                  "float16": 165 * _T, "float8": 330 * _T}),
    ("rtx 3090", {"float32": 35.6 * _T, "tf32": 35.6 * _T, "bfloat16": 71 * _T,
                  "float16": 71 * _T}),
    ("t4", {"float32": 8.1 * _T, "float16": 65 * _T}),
    ("v100", {"float32": 15.7 * _T, "float16": 125 * _T}),
]


class DeviceError(UserError):
    """A device that does not exist here or is spelled wrong; the message says which."""


@dataclass(frozen=True)
class DeviceInfo:
    """Capabilities of one device. Build with `DeviceInfo.detect(...)`; tests build by hand."""

    kind: str  # "cpu" | "cuda" | "mps"
    index: int | None
    name: str
    memory_total: int | None  # bytes; None where unknown (CPU: physical RAM if known)
    capability: tuple[int, int] | None = None  # CUDA compute capability
    supports_bf16: bool = False
    supports_fp16: bool = True
    supports_tf32: bool = False
    supports_fp8: bool = False
    peak_flops: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind, self.index) if self.index is not None else torch.device(
            self.kind
        )

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def peak_for(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for a compute dtype name, or None when not known."""
        return self.peak_flops.get(dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capability"] = list(self.capability) if self.capability else None
        d["notes"] = list(self.notes)
        return d

    @staticmethod
    def detect(spec: str = "auto") -> DeviceInfo:
        """Resolve `auto`, `cpu`, `cuda`, `cuda:N` or `mps` to the device's capabilities."""
        kind, index = _parse_spec(spec)
        if kind == "cuda":
            return _cuda_info(index or 0)
        if kind == "mps":
            return DeviceInfo(kind="mps", index=None, name="Apple MPS", memory_total=None,
                              supports_bf16=True, supports_fp16=True)
        return _cpu_info()


def _parse_spec(spec: str) -> tuple[str, int | None]:
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda", torch.cuda.current_device()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps", None
        return "cpu", None
    kind, _, idx = spec.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (idx and not idx.isdigit()):
        raise DeviceError(f"device {spec!r} is not one of: auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} was asked for but this torch build sees no CUDA device "
            f"(torch {torch.__version__}); use device: cpu or auto"
        )
    if kind == "cuda" and idx and int(idx) >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise DeviceError("device 'mps' was asked for but MPS is not available here")
    return kind, int(idx) if idx else None


def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    name = props.name
    return DeviceInfo(
        kind="cuda",
        index=index,
        name=name,
        memory_total=int(props.total_memory),
        capability=cap,
        supports_bf16=cap >= (8, 0),
        supports_fp16=True,
        supports_tf32=cap >= (8, 0),
        supports_fp8=cap >= (8, 9),
        peak_flops=lookup_peak_flops(name),
    )


def _cpu_info() -> DeviceInfo:
    name = _cpu_name()
    # CPU autocast runs bf16 and fp16 on every x86/ARM build of torch >= 2.4; whether it is
    # *fast* depends on AMX/AVX512-BF16, which is a speed question, not a capability one.
    return DeviceInfo(
        kind="cpu",
        index=None,
        name=name,
        memory_total=_physical_memory(),
        supports_bf16=True,
        supports_fp16=True,
        notes=(f"{torch.get_num_threads()} torch threads",),
    )


def lookup_peak_flops(name: str) -> dict[str, float]:
    lowered = name.lower()
    for key, table in PEAK_FLOPS:
        if key in lowered:
            return dict(table)
    return {}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---- how float32 matmuls compute ---------------------------------------------------------
# torch >= 2.9 has per-backend `fp32_precision` settings beside the legacy
# float32-matmul-precision/allow_tf32 switches, and raises if a process mixes the two. So:
# speak the legacy API (which torch maps onto the new flags), unless the process already
# used the new one, which makes the legacy getter raise; then speak the new one.
_NEW_API_FLAGS = ("cuda.matmul", "cudnn.conv", "mkldnn.matmul")


@contextlib.contextmanager
def float32_matmul(precision: str) -> Iterator[None]:
    """Compute float32 matmuls and convolutions at `precision` inside; restore on exit.

    "highest" is IEEE float32 everywhere. "high" allows TF32 on CUDA; on CPUs with AMX,
    torch's "high"/"medium" would compute in bf16, so there it stays IEEE.
    """
    saved = _read_matmul_flags()
    try:
        _write_matmul_flags(precision, saved["legacy"])
        yield
    finally:
        _restore_matmul_flags(saved)


def _backend(path: str) -> Any:
    obj: Any = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _read_matmul_flags() -> dict[str, Any]:
    try:
        return {"legacy": True, "matmul": torch.get_float32_matmul_precision(),
                "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    except RuntimeError:
        return {"legacy": False, **{p: _backend(p).fp32_precision for p in _NEW_API_FLAGS}}


def _write_matmul_flags(precision: str, legacy: bool) -> None:
    tf32 = precision != "highest"
    if legacy:
        # This covers CUDA and oneDNN matmuls (touching cuda.matmul.allow_tf32 as well would
        # desynchronise them); cuDNN convolutions have their own switch.
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = tf32
        return
    for path in _NEW_API_FLAGS:
        # "tf32" is a CUDA mode; on oneDNN (CPU) anything below "highest" stays IEEE here.
        _backend(path).fp32_precision = "tf32" if tf32 and "mkldnn" not in path else "ieee"


def _restore_matmul_flags(flags: dict[str, Any]) -> None:
    if flags["legacy"]:
        torch.set_float32_matmul_precision(flags["matmul"])
        torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
        return
    for path in _NEW_API_FLAGS:
        _backend(path).fp32_precision = flags[path]
