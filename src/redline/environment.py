"""The environment snapshot: can training run here, and with what?

Versions, the device and what it can do (bf16, fp16, tf32, fp8, memory, peak FLOP/s),
which optional extras are installed, and warnings. A *blocker* means training cannot run
at all. `redline doctor` prints it (exit 1 on a blocker, diagnose/doctor.py); every run directory
keeps it as environment.json.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from redline import __version__
from redline.device import DeviceInfo
from redline.precision import PRECISIONS
from redline.telemetry.sinks import EXTRAS as TRACKER_EXTRAS

# extra name -> packages it brings (import name, distribution name); the trackers' extras
# come from the sink registry
EXTRAS: dict[str, list[tuple[str, str]]] = {
    "examples": [("skimage", "scikit-image"), ("sklearn", "scikit-learn"),
                 ("torchmetrics", "torchmetrics"), ("xarray", "xarray"),
                 ("iris_sample_data", "iris-sample-data"), ("pycocoevalcap", "pycocoevalcap")],
    "fp8": [("torchao", "torchao")],
    "lightning": [("lightning", "lightning")],
    "transformers": [("transformers", "transformers"), ("accelerate", "accelerate")],
    **{extra: [(module, module)] for module, extra in TRACKER_EXTRAS.values()},
}
MIN_TORCH = (2, 4)


@dataclass
class Report:
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blockers

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "warnings": self.warnings, "blockers": self.blockers, "ok": self.ok}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _distributed() -> dict[str, bool]:
    """What torchrun training can use here (docs/distributed.md)."""
    import torch.distributed as dist

    available = dist.is_available()
    return {"available": available, "gloo": available and dist.is_gloo_available(),
            "nccl": available and dist.is_nccl_available()}


def environment_check(device: str = "auto") -> Report:
    report = Report()
    report.info["redline"] = __version__
    report.info["python"] = platform.python_version()
    report.info["platform"] = platform.platform()
    report.info["torch"] = torch.__version__
    report.info["cuda"] = torch.version.cuda
    report.info["cuda_available"] = torch.cuda.is_available()
    report.info["cpu_count"] = os.cpu_count()
    report.info["torch_threads"] = torch.get_num_threads()
    torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if torch_version < MIN_TORCH:
        report.blockers.append(f"torch {torch.__version__} is too old; redline needs "
                               f"{'.'.join(map(str, MIN_TORCH))} or newer")
    try:
        info = DeviceInfo.detect(device)
    except ValueError as e:
        report.blockers.append(str(e))
        info = DeviceInfo.detect("cpu")
    report.info["device"] = info.to_dict()
    report.info["precisions"] = {
        name: cls.unsupported_reason(info) or "ok" for name, cls in PRECISIONS.items()
    }
    report.info["extras"] = {
        extra: all(importlib.util.find_spec(mod) is not None for mod, _ in pkgs)
        for extra, pkgs in EXTRAS.items()
    }
    report.info["packages"] = {
        dist: _version(dist) for pkgs in EXTRAS.values() for _, dist in pkgs
    }
    if info.kind == "cpu":
        report.warnings.append("no GPU found: training runs on the CPU"
                               + ("" if torch.version.cuda else " (this torch is a CPU build)"))
    elif info.is_cuda and not info.peak_flops:
        report.warnings.append(f"no peak-FLOPs entry for {info.name}: MFU will be left empty")
    report.info["distributed"] = _distributed()
    if info.is_cuda and torch.cuda.device_count() > 1 and not report.info["distributed"]["nccl"]:
        report.warnings.append(f"{torch.cuda.device_count()} GPUs but this torch has no "
                               "NCCL: torchrun training across them cannot start; install a "
                               "CUDA build of torch with NCCL")
    if not report.info["extras"]["examples"]:
        report.warnings.append("the built-in example tasks need: pip install 'redline[examples]'")
    return report
