"""Models for the memory levers (issue 20): one whose activations dominate, one whose states do.

`MemGPT`: a small GPT with its own pre-norm blocks in a `ModuleList` (what a researcher
writes), attention through `F.scaled_dot_product_attention`, next-token loss over random
tokens. Sizes are task_args (`--set task_args.layers=6`). At the defaults (width 64,
4 layers, sequence 128) a step takes milliseconds; at width 256, 6 layers, sequence 512
(`bench/levers.py`) its activations are most of the step's memory.

`WideMLP`: residual MLP blocks in a `Sequential`, few samples' worth of activations and
many parameters: the optimizer's state is most of the step's memory.

`OwnOptimizer`: MemGPT with the task's own SGD, which a low-bit state lever must not replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.drop = nn.Dropout(dropout)  # p=0 (the default) draws no random numbers
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, width: int, layers: int, heads: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.layers = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class MemGPT:
    name = "memgpt"

    def __init__(self, n: int = 64, vocab: int = 128, seq: int = 128, width: int = 64,
                 layers: int = 4, heads: int = 4, dropout: float = 0.0) -> None:
        self.shape = (vocab, seq, width, layers, heads, dropout)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.eval_ids = torch.randint(0, vocab, (max(4, n // 8), seq + 1), generator=g)

    def build_model(self) -> nn.Module:
        return GPT(*self.shape)

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.ids)

    def eval_data(self) -> TensorDataset:
        return TensorDataset(self.eval_ids)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        ids = batch[0]
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class ResidualMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(self.norm(x))))


class WideMLP:
    name = "wide-mlp"

    def __init__(self, n: int = 256, dim: int = 64, width: int = 256, hidden: int = 1024,
                 layers: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randn(n, 1, generator=g)
        self.shape = (dim, width, hidden, layers)

    def build_model(self) -> nn.Module:
        dim, width, hidden, layers = self.shape
        return nn.Sequential(nn.Linear(dim, width),
                             *(ResidualMLP(width, hidden) for _ in range(layers)),
                             nn.Linear(width, 1))

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> TensorDataset:
        return TensorDataset(self.x[:32], self.y[:32])

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])


class OwnOptimizer(MemGPT):
    name = "memgpt-own-optimizer"

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01)
