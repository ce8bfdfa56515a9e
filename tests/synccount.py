"""Counting host reads of tensor values with a dispatch mode (no frame inspection).

Every way Python reads a tensor's value (`.item()`, `float(t)`, `bool(t)`, `int(t)`) goes
through aten's `_local_scalar_dense`; a copy from a device to the CPU is `_to_copy` or
`copy_` with a CPU destination and a non-CPU source. On a GPU each is a host-device sync.
(`.tolist()` reads host memory without dispatching: the window logger's once-per-window
read of its stacked values, which on CUDA comes from pinned memory a window late.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostReads(TorchDispatchMode):
    """`count`: host reads since construction (or since the caller reset it)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is _READ:
            self.count += 1
        elif func in _COPIES:
            src = args[0] if func is _COPIES[0] else args[1]
            dst = (torch.device(kwargs.get("device") or src.device) if func is _COPIES[0]
                   else args[0].device)
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.type == "cpu":
                self.count += 1
        return func(*args, **kwargs)
