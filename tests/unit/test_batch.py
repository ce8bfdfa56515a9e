"""The one batch helper, on every structure the Engine accepts, under every precision."""

from __future__ import annotations

import copy
import dataclasses
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from redline import batch as batch_tree
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.precision import get_precision

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    y: torch.Tensor


pytree.register_dataclass(Sample)

N = 7
torch.manual_seed(0)
X, Y = torch.randn(N, 5), torch.randint(0, 3, (N,))
CAPTIONS = [f"caption {i}" for i in range(N)]

# structure -> (the batch, how the loss finds x and y in it)
STRUCTURES: dict[str, tuple[Any, Callable[[Any], tuple[torch.Tensor, torch.Tensor]]]] = {
    "tuple": ((X, Y), lambda b: (b[0], b[1])),
    "list": ([X, Y], lambda b: (b[0], b[1])),
    "dict": ({"x": X, "y": Y}, lambda b: (b["x"], b["y"])),
    "namedtuple": (Pair(X, Y), lambda b: (b.x, b.y)),
    "dataclass": (Sample(X, Y), lambda b: (b.x, b.y)),
    "nested": ({"inputs": (X, {"text": CAPTIONS}), "scale": 2.0, "meta": Pair(Y, torch.ones(()))},
               lambda b: (b["inputs"][0], b["meta"].x)),
}
PRECISIONS = ["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]
TOLERANCE = {"fp32": 1e-5, "bf16-mixed": 3e-2, "fp16-mixed": 3e-2, "bf16-true": 6e-2}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_count_split_and_slice_keep_the_structure(name: str) -> None:
    batch, get = STRUCTURES[name]
    assert batch_tree.size(batch) == N and batch_tree.leading_size(batch) == N
    chunks = batch_tree.split(batch, 3)
    assert [n for _, n in chunks] == [3, 3, 1]
    last, _ = chunks[-1]
    assert type(last) is type(batch)
    x, y = get(last)
    assert torch.equal(x, X[6:]) and torch.equal(y, Y[6:])
    if name == "nested":
        assert last["inputs"][1]["text"] == ["caption 6"]  # per-sample strings are sliced
        assert last["scale"] == 2.0 and last["meta"].y.shape == ()  # shared values are not
    assert batch_tree.split(batch, N)[0][0] is batch  # one chunk: the batch itself


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_move_and_cast_reach_every_tensor(name: str) -> None:
    batch, get = STRUCTURES[name]
    cast = batch_tree.cast(batch, torch.bfloat16)
    x, y = get(cast)
    assert x.dtype == torch.bfloat16 and y.dtype == Y.dtype  # labels stay integers
    moved = batch_tree.move(batch, torch.device("meta"))
    assert all(t.device.type == "meta" for t in pytree.tree_leaves(moved)
               if isinstance(t, torch.Tensor))


def test_disagreeing_sizes_and_empty_batches_are_errors() -> None:
    with pytest.raises(ValueError, match="disagree"):
        batch_tree.size((torch.zeros(4), torch.zeros(3)))
    with pytest.raises(ValueError, match="disagree"):
        batch_tree.size({"x": torch.zeros(4), "ids": ["a", "b"]})
    with pytest.raises(ValueError, match="no tensor"):
        batch_tree.size({"a": 1})


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.body(x)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_micro_batches_of_any_structure_give_the_full_batch_gradient(name: str,
                                                                    precision: str) -> None:
    batch, get = STRUCTURES[name]
    device = DeviceInfo.detect("cpu")

    def loss_fn(model: nn.Module, b: Any) -> torch.Tensor:
        x, y = get(b)
        return nn.functional.cross_entropy(model(x).float(), y)

    grads = []
    for micro in (None, 3):
        torch.manual_seed(1)
        policy = get_precision(precision, device)
        model = policy.convert_module(_Net())
        engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.0), policy,
                        micro_batch_size=micro)
        with policy.global_context():
            engine.step(copy.deepcopy(batch), loss_fn)
        grads.append([p.grad.float() for p in model.parameters()])
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert set(model.seen) == {expected}  # bf16-true casts inputs of every structure
        assert len(model.seen) == (1 if micro is None else 3)
    for full, split in zip(*grads, strict=True):
        torch.testing.assert_close(split, full, rtol=TOLERANCE[precision],
                                   atol=TOLERANCE[precision])
