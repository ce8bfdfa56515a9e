"""The model's blocks: the repeated units that activation checkpointing wraps, the memory
breakdown measures activations per, and FSDP shards one by one.

Found once, shared by all of them. Automatically, a block is a child of an
`nn.ModuleList` or `nn.Sequential` whose class repeats there most often (at least twice;
children without parameters, such as activations, do not count), searched from the root
down and stopping at the first container that has such children on each path: a
transformer's `layers`, a UNet's resolution blocks, a ResNet stage's BasicBlocks. A
container of single layers (an MLP written as `Sequential(Linear, ReLU, Linear)`)
repeats `Linear`, and its Linears are its blocks. Or the user names them:
`memory.checkpoint_blocks` is a glob over the names `model.named_modules()` gives
("layers.*", "encoder.blocks.*"); the outermost matches are the blocks.

Blocks never nest (a match inside another block is dropped) and are returned in the
order `named_modules()` visits them, the order forward usually runs them.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

from torch import nn

from redline.errors import ConfigError

_CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class Block:
    """One block: its name in `model.named_modules()` and the module."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[Block]:
    """The model's blocks (module docstring): named by the glob `pattern`, else found.

    A pattern that matches nothing raises ConfigError naming some module names to choose
    from; a model with no repeated children has no blocks (an empty list)."""
    if pattern is not None:
        return _matching(model, pattern)
    blocks: list[Block] = []
    _search(model, "", blocks)
    return blocks


def _search(module: nn.Module, prefix: str, out: list[Block]) -> None:
    if isinstance(module, _CONTAINERS):
        children = list(module.named_children())
        counts = Counter(type(c) for _, c in children if any(True for _ in c.parameters()))
        most = max(counts.values(), default=0)
        repeated = [(n, c) for n, c in children if most >= 2 and counts[type(c)] == most]
        if repeated:
            out.extend(Block(_join(prefix, n), c) for n, c in repeated)
            return
    for name, child in module.named_children():
        _search(child, _join(prefix, name), out)


def _matching(model: nn.Module, pattern: str) -> list[Block]:
    blocks: list[Block] = []
    for name, module in model.named_modules():
        if not name or not fnmatch.fnmatchcase(name, pattern):
            continue
        if any(name.startswith(b.name + ".") for b in blocks):
            continue  # inside a block already found: blocks never nest
        blocks.append(Block(name, module))
    if not blocks:
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:8]
        raise ConfigError(
            f"memory.checkpoint_blocks {pattern!r} matches no module of the model; module "
            f"names look like {', '.join(names) or '(the model has no submodules)'}; use a "
            'glob such as "layers.*", or null to find the blocks automatically')
    return blocks


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
