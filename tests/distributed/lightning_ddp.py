"""Run under torchrun: the batch search, then Lightning's DDP fit with RedlineCallback;
the run directory is argv[1] (rank 0 writes it)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

import lightning as L
from tests.integrations.test_lightning import Data, Regressor

from redline.integrations.lightning import RedlineCallback, find_batch_size

plan = find_batch_size(Regressor(), Data(), effective_batch_size=128, memory_budget="100KiB")
trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0,
                    accumulate_grad_batches=plan.accumulate_grad_batches,
                    callbacks=[RedlineCallback(sys.argv[1], log_every=2)])
trainer.fit(Regressor(), Data(plan.micro_batch))
