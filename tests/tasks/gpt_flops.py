"""A small GPT whose FLOPs are known in closed form, for the MFU tests (issue 19, case 5).

Sequence 64, width 64, 2 layers, 4 heads, attention through `F.scaled_dot_product_attention`
(on CPU: `aten._scaled_dot_product_flash_attention_for_cpu`). Every Linear is bias-free,
so a step's matmul FLOPs are exactly 6·N·tokens with N the Linear weights, and attention
adds 12·layers·tokens·seq·d (QKᵀ and AV, forward once and backward twice, over the full
S×S square as torch's formulas count it). The input embeddings need gradients (their
tables train), so every Linear computes its input gradient too: nothing is short of 6·N.

`GptFlopsCheckpointed` is the same model with each block under `torch.utils.checkpoint`:
its model FLOPs must be the same, its hardware FLOPs larger by the blocks' forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

SEQ, WIDTH, LAYERS, HEADS, VOCAB = 64, 64, 2, 4, 96


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))


def matmul_weights(model: nn.Module) -> int:
    """N of 6·N·tokens: the weights used in matmuls (the Linears; not the lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


class GptFlops:
    name = "gpt-flops"
    checkpointing = False

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)

    def build_model(self) -> nn.Module:
        return TinyGPT(self.checkpointing)

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.ids)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        ids = batch[0]
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


class GptFlopsCheckpointed(GptFlops):
    name = "gpt-flops-checkpointed"
    checkpointing = True
