"""A user's HF Trainer script: a tiny BERT built from its config (no hub) classifying pydoc
topics' paragraphs by length bucket, gradient_accumulation_steps=4, recorded by redline's
callback.  python hf_accum.py RUN_DIR [ACCUMULATE]"""
import json
import pydoc_data.topics as topics
import sys

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from redline.integrations.transformers import RedlineCallback

SEQ = 64


class Paragraphs(Dataset):
    def __init__(self, paragraphs: list[str]) -> None:
        self.items = []
        for p in paragraphs:
            ids = [min(ord(c), 255) + 2 for c in p[:SEQ]]
            mask = [1] * len(ids) + [0] * (SEQ - len(ids))
            self.items.append({"input_ids": torch.tensor(ids + [0] * (SEQ - len(ids))),
                               "attention_mask": torch.tensor(mask),
                               "labels": torch.tensor(min(len(p) // 200, 3))})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def main() -> None:
    run_dir, accumulate = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    paragraphs = [p for t in topics.topics.values() for p in t.split("\n\n") if len(p) > 20]
    train, evaluation = Paragraphs(paragraphs[:1200]), Paragraphs(paragraphs[1200:1400])
    config = BertConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=SEQ, num_labels=4)
    args = TrainingArguments(output_dir=run_dir + "/hf", per_device_train_batch_size=8,
                             gradient_accumulation_steps=accumulate, max_steps=20,
                             learning_rate=5e-4, logging_steps=1, eval_strategy="steps",
                             eval_steps=10, report_to=[], save_strategy="no",
                             max_grad_norm=1.0, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args,
                      train_dataset=train, eval_dataset=evaluation,
                      callbacks=[RedlineCallback(run_dir, log_every=1)])
    trainer.train()
    with open(run_dir + "/hf_log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main()
