"""The models the overhead benchmarks step: each with its optimizer, scheduler and data.

Every workload is what a user's hand-written loop would train, and what `redline train`
runs for it: AdamW (fused, as `redline train` builds it: 3x faster than foreach on CPU,
and it skips a non-finite step on the device), a LambdaLR scheduler stepped once per step (redline's
constant schedule), gradient clipping at 1.0, pre-made batches. The floor loop and every
redline variant step the same model, optimizer and scheduler objects in turn.

  mlp-small   Linear(128,512)-GELU-Linear(512,128), batch 160      (~2 ms on 1 thread)
  mlp-large   Linear(512,2048)-GELU-Linear(2048,512), batch 176    (~15-30 ms)
  conv-bn     3 conv + BatchNorm2d + ReLU blocks, batch 32 of 3x16x16, 10 classes
              (~3.5 ms): the OOM guard snapshots BatchNorm statistics every step
  mlp-groups  the small MLP with three parameter groups (weights with decay, biases
              without, the last layer at another lr), batch 160: what fine-tuning recipes do
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LR, CLIP = 1e-4, 1.0


@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: list[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    peers: bool  # also time wandb.log, Lightning and Accelerate on it

    @property
    def batch_size(self) -> int:
        return self.data[0][0].shape[0]


def _mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _mlp_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def _constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def mlp(width: int, batch: int, name: str, peers: bool = True) -> Workload:
    torch.manual_seed(0)
    net = _mlp_net(width)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01, fused=True)
    data = [(torch.randn(batch, width), torch.randn(batch, width)) for _ in range(8)]
    return Workload(name, net, opt, _constant(opt), data, _mse, peers)


def conv_bn(batch: int = 32, size: int = 16) -> Workload:
    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01, fused=True)
    data = [(torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
            for _ in range(8)]
    return Workload(f"conv net with BatchNorm, batch {batch} of {size}x{size}", net, opt,
                    _constant(opt), data, _cross_entropy, peers=False)


def mlp_groups(width: int = 128, batch: int = 160) -> Workload:
    w = mlp(width, batch, f"MLP {width} with 3 parameter groups, batch {batch}", peers=False)
    first, last = w.model[0], w.model[2]
    groups = [{"params": [first.weight], "weight_decay": 0.01},
              {"params": [first.bias], "weight_decay": 0.0},
              {"params": list(last.parameters()), "lr": LR / 10, "weight_decay": 0.0}]
    w.optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
    w.scheduler = _constant(w.optimizer)
    return w


def build(names: list[str], small: str, large: str) -> list[Workload]:
    """The workloads named (mlp-small, mlp-large, conv-bn, mlp-groups); sizes as WIDTHxBATCH."""
    sw, sb = (int(x) for x in small.split("x"))
    lw, lb = (int(x) for x in large.split("x"))
    makers: dict[str, Callable[[], Workload]] = {
        "mlp-small": lambda: mlp(sw, sb, f"MLP {sw}, batch {sb}"),
        "mlp-large": lambda: mlp(lw, lb, f"MLP {lw}, batch {lb}"),
        "conv-bn": conv_bn,
        "mlp-groups": lambda: mlp_groups(sw, sb),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(makers)}")
    return [makers[n]() for n in names]
