"""Random-number generator state: captured, restored, and kept across a block.

Two captures, for two costs:

  - `rng_state` / `set_rng_state` / `preserved_rng`: every generator training can draw
    from (Python's `random`, numpy's global, torch's CPU and CUDA ones), as plain data, so
    a checkpoint holds it (loads with weights_only) and tuning leaves training's streams
    where they were. ~40 us: numpy's state is the dear part.
  - `torch_state` / `restore_torch_state` / `same_torch_state`: torch's CPU generator and
    the named CUDA ones only, as tensors, ~3.5 us: what the OOM guard snapshots per step
    while a step draws random numbers (memory/guard.py: StepRng). Model code draws from
    torch's generators; a loss that draws from `random` or `np.random` is redone exactly in
    everything but those draws.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

# (CPU state, [(CUDA device index, state)] or None)
TorchState = tuple[torch.Tensor, list[tuple[int, torch.Tensor]] | None]


def rng_state() -> dict[str, Any]:
    """Every RNG that training can draw from, as plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Every generator back to `state` (from `rng_state`, or a checkpoint's copy of it)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # torch.cuda's setter, not the generators': CUDA may not be initialised yet in a
        # resumed process, and it defers the restore until it is
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every generator `rng_state` covers is where it was before, once the block ends."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def torch_state(cuda_devices: Sequence[int] | None = None) -> TorchState:
    """torch's CPU generator's state and the CUDA ones' of `cuda_devices` (None: all, where
    CUDA is in use); the cheap capture (module docstring)."""
    cuda = None
    if cuda_devices is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = range(len(torch.cuda.default_generators))
    if cuda_devices:  # a CPU model asks nothing of CUDA: no per-step availability check
        gens = torch.cuda.default_generators
        cuda = [(i, gens[i].get_state()) for i in cuda_devices]
    return torch.default_generator.get_state(), cuda


def restore_torch_state(state: TorchState) -> None:
    cpu, cuda = state
    torch.default_generator.set_state(cpu)
    for i, device_state in cuda or ():
        torch.cuda.default_generators[i].set_state(device_state)


def same_torch_state(a: TorchState | None, b: TorchState) -> bool:
    """Whether nothing drew between the captures `a` and `b` (None: no capture, False)."""
    if a is None:
        return False
    (cpu_a, cuda_a), (cpu_b, cuda_b) = a, b
    return torch.equal(cpu_a, cpu_b) and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(cuda_a or (), cuda_b or (), strict=True))
