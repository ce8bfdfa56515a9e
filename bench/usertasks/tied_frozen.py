"""A user's character LM with tied input/output weights, a frozen positional table, a
buffer, and activation checkpointing on its blocks."""
import pydoc_data.topics as topics

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

SEQ = 64


class Chars(Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return (len(self.ids) - 1) // SEQ

    def __getitem__(self, i: int):
        s = self.ids[i * SEQ:(i + 1) * SEQ + 1]
        return s[:-1], s[1:]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = 4

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TiedLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02, requires_grad=False)  # frozen
        self.register_buffer("scale", torch.tensor(d ** -0.5))
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.training else blk(x)
        return self.head(x) * self.scale * 8


class TiedFrozen:
    name = "tied-frozen"

    def __init__(self) -> None:
        text = "".join(topics.topics.values())[:200_000]
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        self.vocab = len(chars)
        ids = torch.tensor([index[c] for c in text])
        cut = int(len(ids) * 0.9)
        self.tr, self.ev = Chars(ids[:cut]), Chars(ids[cut:])

    def build_model(self):
        return TiedLM(self.vocab)

    def train_data(self):
        return self.tr

    def eval_data(self):
        return self.ev

    def loss(self, model, batch):
        ids, labels = batch
        return nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
