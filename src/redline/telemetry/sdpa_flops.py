"""FLOP formulas for the attention kernels torch's `FlopCounterMode` does not know.

`F.scaled_dot_product_attention` picks a kernel per device and input: on CPU it runs
`aten._scaled_dot_product_flash_attention_for_cpu` (and its backward), for which torch
2.13's counter has no formula, so a transformer's attention counted as 0 there. Torch
does count the CUDA kernels (flash, efficient, cudnn: `_scaled_dot_product_*_attention`
and `_flash/_efficient_attention_forward/backward`) and flex attention; the math
fallback decomposes into `bmm`, which it counts too. The kernels added here are counted
with torch's own formulas (`sdpa_flop_count`, `sdpa_backward_flop_count`: 4·b·h·s_q·s_k·d
forward, 2·b·h·s_q·s_k·(3·d_qk + 2·d_v) backward), so a model counts the same whichever
kernel ran.

Nothing is registered globally: `attention_formulas()` is a mapping for
`FlopCounterMode(custom_mapping=...)` holding only the kernels torch's own registry
lacks, so when torch adds a formula for one of them, torch's is used and nothing clashes.

The fused kernels keep no S×S probability matrix: their backward recomputes QKᵀ (the
first of the five products `sdpa_backward_flop_count` counts). That is recomputation,
like activation checkpointing, so `recomputed_share` names it: model FLOPs leave it out
(attention is then 12·b·s_q·s_k·d per layer for forward and backward, as PaLM's MFU
counts it and as the math kernel, which keeps the matrix, runs it) and hardware FLOPs keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

Formula = Callable[..., int]

aten = torch.ops.aten


def _forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, out_val: Any = None,
             **kwargs: Any) -> int:
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


def _backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any,
              out_val: Any = None, **kwargs: Any) -> int:
    return int(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))


def _flash_into_out(out: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    # the in-place flash forward takes `out` first, then _flash_attention_forward's arguments
    return int(flop_counter.flop_registry[aten._flash_attention_forward](*args, **kwargs))


# op name -> raw formula (called with the op's tensors, as FlopCounterMode calls formulas
# registered with get_raw=True); names a torch build lacks are skipped.
_MISSING: dict[str, Formula] = {
    "_scaled_dot_product_flash_attention_for_cpu": _forward,  # CPU
    "_scaled_dot_product_flash_attention_for_cpu_backward": _backward,
    "_scaled_dot_product_fused_attention_overrideable": _forward,  # XPU, out-of-tree devices
    "_scaled_dot_product_fused_attention_overrideable_backward": _backward,
    "_scaled_dot_product_attention_math_for_mps": _forward,  # Apple GPUs
    "_flash_attention_forward_no_dropout_inplace": _flash_into_out,
}

# Backward kernels that recompute QKᵀ, with the positions of query and value in their
# arguments (the head dims fix the recomputed share of torch's backward formula).
_RECOMPUTING_BACKWARDS: dict[str, tuple[int, int]] = {
    "_scaled_dot_product_flash_attention_for_cpu_backward": (1, 3),
    "_scaled_dot_product_fused_attention_overrideable_backward": (1, 3),
    "_scaled_dot_product_flash_attention_backward": (1, 3),
    "_scaled_dot_product_efficient_attention_backward": (1, 3),
    "_scaled_dot_product_cudnn_attention_backward": (1, 3),
    "_flash_attention_backward": (1, 3),
    "_efficient_attention_backward": (1, 3),
}


def _packets(names: Any) -> dict[Any, Any]:
    return {getattr(aten, name): value for name, value in names.items() if hasattr(aten, name)}


def attention_formulas() -> dict[Any, Formula]:
    """Raw formulas for the attention kernels torch's FLOP registry lacks, by op packet."""
    return {op: f for op, f in _packets(_MISSING).items() if op not in flop_counter.flop_registry}


def recomputing_backwards() -> dict[Any, tuple[int, int]]:
    """Attention backward kernels that recompute QKᵀ: op packet -> (query, value) positions.

    Flex attention's backward (a higher-order op, query first and value third) recomputes
    too; it is added when this torch has it.
    """
    found = _packets(_RECOMPUTING_BACKWARDS)
    try:
        from torch._higher_order_ops.flex_attention import flex_attention_backward
    except ImportError:  # a torch without flex attention
        return found
    return {**found, flex_attention_backward: (0, 2)}


def recomputed_share(positions: tuple[int, int], args: tuple[Any, ...]) -> tuple[int, int]:
    """(numerator, denominator) of a recomputing backward's FLOPs spent on QKᵀ again.

    torch's backward formula is 2·b·h·s_q·s_k·(3·d_qk + 2·d_v): QKᵀ recomputed, dS from
    dO·Vᵀ, dV, dQ and dK; the recomputed product is the d_qk of one of them.
    """
    d_qk, d_v = args[positions[0]].shape[-1], args[positions[1]].shape[-1]
    return int(d_qk), int(3 * d_qk + 2 * d_v)
