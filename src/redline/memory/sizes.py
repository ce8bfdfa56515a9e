"""Sizes: parsing "2GiB", printing bytes, counting the bytes model and optimizer hold."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import nn

from redline._torch_compat import plain_tensors

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12,
}


def parse_size(value: str | int | None, *, name: str = "memory.budget") -> int | None:
    """Bytes from "2GiB", "512MiB", "1.5GB", "300MB", "64KiB", "1024" or an int; None stays.

    Binary units (KiB, MiB, GiB, TiB, and bare K/M/G/T as memory limits usually mean) are
    powers of 1024; KB, MB, GB, TB are powers of 1000.
    """
    if value is None:
        return None
    error = ValueError(
        f"{name} must be a size like 2GiB, 512MiB, 1.5GB or a number of bytes, got {value!r}"
    )
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str):  # also bools (True bytes is a typo) and negative ints
        raise error
    text = value.strip().replace("_", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text[len(number):].strip().lower()
    try:
        amount = Decimal(number)
    except InvalidOperation:
        raise error from None
    if unit not in _UNITS or not amount.is_finite() or amount < 0:
        raise error
    return int((amount * _UNITS[unit]).to_integral_value())


def format_size(n: int) -> str:
    """A size in the largest binary unit it reaches, to 3 significant digits: 512 -> "512 B",
    1536 -> "1.50 KiB", 300 * 2**20 -> "300 MiB", 2**31 -> "2.00 GiB".

    Every size redline prints (budgets, peaks, limits) goes through here, so a budget given
    as 300MiB prints as "300 MiB", not as a fraction of a GiB rounded to "0.29 GiB".
    """
    sign, a = ("-" if n < 0 else ""), abs(int(n))
    if a < 2**10:
        return f"{sign}{a} B"
    unit, scale = "TiB", 2**40
    for name, size in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if round(a / size, _decimals(a / size)) < 2**10:
            unit, scale = name, size
            break
    value = a / scale
    return f"{sign}{value:.{_decimals(value)}f} {unit}"


def _decimals(value: float) -> int:
    """Decimals that show `value` (>= 1) to 3 significant digits."""
    return 2 if value < 9.995 else 1 if value < 99.95 else 0


def _iter_tensors(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield from plain_tensors(obj)  # a quantized state: its codes and scales
        return
    if id(obj) in seen:  # containers (optimizer state, module trees) may be shared or cyclic
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        for p in obj.parameters():  # an FSDP shard (a DTensor): its local tensor
            yield from plain_tensors(p)
            if p.grad is not None:
                yield from plain_tensors(p.grad)
        for b in obj.buffers():
            yield from plain_tensors(b)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _iter_tensors(state, seen)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _iter_tensors(v, seen)


def live_tensor_bytes(*objects: Any) -> int:
    """Bytes of the unique storages held by modules (parameters, grads, buffers), optimizers
    (state tensors), tensors and nested lists/tuples/dicts of them. Shared storages (tied
    weights, views) count once. The baseline of model + optimizer for the CPU tracker."""
    storages: set[tuple[str, int]] = set()
    total = 0
    for t in _iter_tensors(objects, set()):
        if t.is_meta or t.layout is not torch.strided:
            continue
        s = t.untyped_storage()
        key = (str(s.device), s.data_ptr())
        if s.nbytes() and key not in storages:
            storages.add(key)
            total += s.nbytes()
    return total
