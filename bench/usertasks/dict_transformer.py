"""A user's tiny character transformer whose batches are dicts."""
import pydoc_data.topics as topics

import torch
from torch import nn
from torch.utils.data import Dataset

SEQ = 64


class Chars(Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return (len(self.ids) - 1) // SEQ

    def __getitem__(self, i: int) -> dict:
        s = self.ids[i * SEQ:(i + 1) * SEQ + 1]
        return {"input_ids": s[:-1], "labels": s[1:]}


class LM(nn.Module):
    def __init__(self, vocab: int, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(SEQ, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.head(self.body(self.emb(input_ids) + self.pos, mask=mask, is_causal=True))


class DictTransformer:
    name = "dict-transformer"

    def __init__(self) -> None:
        text = "".join(topics.topics.values())[:200_000]
        chars = sorted(set(text))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text])
        cut = int(len(ids) * 0.9)
        self.tr, self.ev = Chars(ids[:cut]), Chars(ids[cut:])

    def build_model(self):
        return LM(self.vocab)

    def train_data(self):
        return self.tr

    def eval_data(self):
        return self.ev

    def loss(self, model, batch):
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
