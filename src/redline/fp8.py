"""fp8 training through torchao: which layers convert, which stay in high precision, and why.

redline does not implement fp8 arithmetic: torchao's float8 training
(`convert_to_float8_training`) swaps chosen `nn.Linear` layers for `Float8Linear`, which
casts inputs, weights and output gradients to float8 with dynamic scales and runs the
matmuls in fp8 (on CUDA sm_89+), or, with `emulate=True`, computes the same casts and
rounding in higher precision so that fp8's numerics run on any device, CPU included, with
no speed-up.

Not every layer should convert. `plan` decides for each matmul-bearing layer, in module
order, and says why:

    not nn.Linear            torchao's float8 training converts nn.Linear only (convolutions,
                             embeddings stay as they are)
    a dimension % 16 != 0    fp8 matmul kernels need both dimensions divisible by 16
    first / last Linear      the layers nearest the input and the output are the most
                             sensitive to rounding (the field's default: keep them)
    weight < min_numel       a tiny matmul: the casts and scale computations cost more
                             than fp8 saves

The decisions are plain data (`LayerDecision`) that the run writes to events.jsonl and the
report shows as its fp8 layer table.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from redline._torch_compat import PYTREE_LOGGER
from redline.errors import MissingExtra

RECIPES = ("tensorwise", "rowwise")

# What each recipe does, for the decisions' reasons (torchao's Float8LinearRecipeName).
_RECIPE_WORDS = {
    "tensorwise": "one scale per tensor; e4m3 inputs and weights, e5m2 gradients",
    "rowwise": "one scale per row; e4m3 inputs, weights and gradients",
}

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerDecision:
    """One layer's fp8 decision: converted or not, and the reason in words."""

    name: str
    kind: str  # the module's class name
    shape: str  # "in x out" for a Linear, the weight's shape otherwise
    converted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(model: nn.Module, recipe: str = "tensorwise", keep_first_last: bool = True,
         min_numel: int = 4096) -> list[LayerDecision]:
    """The decision for every Linear and convolution of `model`, in module order."""
    assert recipe in RECIPES, recipe
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    ends = {linears[0]: "first", linears[-1]: "last"} if keep_first_last and linears else {}
    decisions = []
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            decisions.append(LayerDecision(
                name, type(module).__name__, "x".join(map(str, module.weight.shape)), False,
                "torchao's float8 training converts nn.Linear only"))
        elif type(module) is nn.Linear:
            decisions.append(_linear_decision(name, module, recipe, ends.get(name), min_numel))
    return decisions


def _linear_decision(name: str, layer: nn.Linear, recipe: str, end: str | None,
                     min_numel: int) -> LayerDecision:
    shape = f"{layer.in_features}x{layer.out_features}"
    odd = [f"{what} {n}" for what, n in (("in_features", layer.in_features),
                                         ("out_features", layer.out_features)) if n % 16]
    if odd:
        reason = (f"{' and '.join(odd)} not a multiple of 16 (fp8 matmuls need both "
                  "dimensions divisible by 16)")
    elif end:
        reason = (f"the {end} Linear layer, kept in high precision "
                  "(precision.fp8_keep_first_last)")
    elif layer.weight.numel() < min_numel:
        reason = (f"tiny matmul: {layer.weight.numel()} weights < precision.fp8_min_numel "
                  f"{min_numel}; the casts would cost more than fp8 saves")
    else:
        return LayerDecision(name, "Linear", shape, True,
                             f"converted: {recipe} scaling ({_RECIPE_WORDS[recipe]})")
    return LayerDecision(name, "Linear", shape, False, reason)


def convert(model: nn.Module, decisions: list[LayerDecision], recipe: str,
            emulate: bool) -> nn.Module:
    """Swap the layers `decisions` marks as converted for torchao's Float8Linear, in place."""
    float8 = torchao_float8()
    chosen = {d.name for d in decisions if d.converted}
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe),
                                 emulate=emulate)
    return float8.convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, fqn: fqn in chosen)


def torchao_float8() -> Any:
    """`torchao.float8`, or MissingExtra naming the extra that installs it."""
    return torchao_import("torchao.float8", "fp8 training")


def torchao_import(module: str, feature: str) -> Any:
    """A torchao module (`torchao.float8`, `torchao.optim`), imported quietly, or
    MissingExtra naming the extra that installs torchao, for `feature`."""
    # torchao's compiled CUDA extensions are of no use on a CPU build of torch, and
    # loading them prints warnings on every import: skip them there.
    if torch.version.cuda is None:
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    # Its import also logs about skipped extensions and deprecated pytree registrations:
    # nothing a user can act on, so quiet for the import only.
    loggers = [logging.getLogger(n) for n in ("torchao", PYTREE_LOGGER)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(feature, "torchao", "fp8") from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
