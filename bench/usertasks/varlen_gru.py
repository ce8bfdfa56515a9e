"""A user's GRU tagger over variable-length sentences, padded per batch by its collate_fn.

Each sentence of Python's bundled pydoc topics is tagged character by character: vowel,
consonant, digit, space or other. Lengths run from 8 to 256 characters.
"""
import pydoc_data.topics as topics
import re

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from torch.utils.data import Dataset

PAD = -100


def tag(c: str) -> int:
    if c in "aeiouAEIOU":
        return 0
    if c.isalpha():
        return 1
    if c.isdigit():
        return 2
    return 3 if c == " " else 4


class Sentences(Dataset):
    def __init__(self, sentences: list[str], vocab: dict[str, int]) -> None:
        self.items = [(torch.tensor([vocab.get(c, 1) for c in s]),
                       torch.tensor([tag(c) for c in s])) for s in sentences]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Tagger(nn.Module):
    def __init__(self, vocab: int, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.rnn = nn.GRU(d, d, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * d, 5)

    def forward(self, ids, lengths):
        packed = pack_padded_sequence(self.emb(ids), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.head(out)


class VarLenGRU:
    name = "varlen-gru"

    def __init__(self, sentences: int = 4000) -> None:
        text = " ".join(topics.topics.values())
        parts = [p.strip() for p in re.split(r"[.\n]\s", text)]
        parts = [p[:256] for p in parts if len(p) >= 8][:sentences]
        chars = sorted(set("".join(parts)))
        vocab = {c: i + 2 for i, c in enumerate(chars)}  # 0 pad, 1 unknown
        self.vocab = len(vocab) + 2
        cut = int(len(parts) * 0.9)
        self.tr, self.ev = Sentences(parts[:cut], vocab), Sentences(parts[cut:], vocab)

    def build_model(self):
        return Tagger(self.vocab)

    def train_data(self):
        return self.tr

    def eval_data(self):
        return self.ev

    def collate_fn(self, samples):
        ids, tags = zip(*samples, strict=True)
        lengths = torch.tensor([len(s) for s in ids])
        return (pad_sequence(ids, batch_first=True, padding_value=0),
                pad_sequence(tags, batch_first=True, padding_value=PAD), lengths)

    def loss(self, model, batch):
        ids, tags, lengths = batch
        logits = model(ids, lengths)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), tags.flatten(),
                                           ignore_index=PAD)

    def evaluate(self, model, loader):
        right = total = 0
        for ids, tags, lengths in loader:
            pred = model(ids, lengths).argmax(-1)
            mask = tags != PAD
            right += (pred[mask] == tags[mask]).sum().item()
            total += mask.sum().item()
        return {"accuracy": right / total}
