"""Tasks that use the Task hooks real models need (issue 19, observed case 6), written as
a user would, against the protocol only: no redline import.

- `GRUTagger`: a GRU tagging variable-length token sequences; its `collate_fn` pads each
  batch to its longest sequence (dynamic padding). `eval_sets=2` gives `eval_data` as a
  dict of two sets ("short" and "long" sequences).
- `GRUTaggerNoCollate`: the same data and model without a `collate_fn`: torch's
  default_collate cannot stack sequences of different lengths.
- `OneCycleRegression`: a small MLP with BatchNorm that brings its own SGD (lr 0.05,
  momentum) and, with `schedule=True`, a OneCycleLR over the run's steps.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class _Sequences(Dataset):
    """(tokens, tags) pairs of lengths in [low, high]; the tag of a token is its id mod 4."""

    def __init__(self, n: int, low: int, high: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
        self.items = [torch.randint(1, vocab, (length,), generator=g) for length in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.items[i]
        return tokens, tokens % 4


class _Tagger(nn.Module):
    def __init__(self, vocab: int, hidden: int, tags: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, padding_idx=0)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


class GRUTaggerNoCollate:
    """Variable-length sequences and no collate_fn: batches cannot be stacked."""

    name = "gru-tagger"
    vocab, hidden, tags = 32, 32, 4

    def __init__(self, n: int = 256, eval_sets: int = 1) -> None:
        self.n, self.eval_sets = n, eval_sets

    def build_model(self) -> nn.Module:
        return _Tagger(self.vocab, self.hidden, self.tags)

    def train_data(self) -> Dataset:
        return _Sequences(self.n, 3, 12, self.vocab, seed=1)

    def eval_data(self) -> Dataset | dict[str, Dataset]:
        short = _Sequences(48, 2, 5, self.vocab, seed=2)
        if self.eval_sets == 1:
            return short
        return {"short": short, "long": _Sequences(48, 10, 20, self.vocab, seed=3)}

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, tags = batch
        logits = model(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, self.tags).float(),
                                           tags.reshape(-1), ignore_index=-100)

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        right = total = 0
        for tokens, tags in loader:
            keep = tags != -100
            right += int((model(tokens).argmax(-1) == tags)[keep].sum())
            total += int(keep.sum())
        return {"accuracy": right / max(total, 1)}


class GRUTagger(GRUTaggerNoCollate):
    """The same, with dynamic padding: each batch padded to its own longest sequence."""

    def collate_fn(self, samples: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(tokens) for tokens, _ in samples)
        tokens = torch.zeros(len(samples), longest, dtype=torch.long)
        tags = torch.full((len(samples), longest), -100, dtype=torch.long)
        for i, (t, y) in enumerate(samples):
            tokens[i, :len(t)], tags[i, :len(y)] = t, y
        return tokens, tags


class OneCycleRegression:
    """A BatchNorm MLP bringing its own SGD (lr 0.05) and, with `schedule`, a OneCycleLR
    over the run's steps; input noise draws from torch's RNG, as toy.py's does."""

    name = "onecycle"

    def __init__(self, n: int = 512, dim: int = 8, schedule: bool = True,
                 sleep_s: float = 0.0) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(dim, 1, generator=g))
        self.dim, self.sleep_s = dim, sleep_s
        if not schedule:
            self.scheduler = None  # type: ignore[assignment]

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.dim, 32), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 1))

    def train_data(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    def eval_data(self) -> TensorDataset:
        return TensorDataset(self.x[:64], self.y[:64])

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05,
                                                   total_steps=total_steps)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.sleep_s and model.training:
            time.sleep(self.sleep_s)
        return nn.functional.mse_loss(model(x + 0.01 * torch.randn_like(x)), y)
