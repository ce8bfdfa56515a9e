"""A user's LightningModule (BatchNorm CNN on digits) with accumulate_grad_batches=4,
recorded by redline's callback.  python lit_accum.py RUN_DIR [ACCUMULATE]"""
import json
import sys

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from redline.integrations.lightning import RedlineCallback


class DigitsModule(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.seen: list[float] = []
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        self.seen.append(loss.item())  # the user's own record of each micro-batch's loss
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    run_dir, accumulate = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=64)
    trainer = L.Trainer(max_steps=40, accumulate_grad_batches=accumulate, log_every_n_steps=1,
                        gradient_clip_val=1.0, callbacks=[RedlineCallback(run_dir, log_every=1)],
                        enable_progress_bar=False, logger=L.pytorch.loggers.CSVLogger(run_dir),
                        val_check_interval=20, enable_checkpointing=False)
    module = DigitsModule()
    trainer.fit(module, train, val)
    with open(run_dir + "/micro_batch_losses.json", "w") as f:
        json.dump(module.seen, f)


if __name__ == "__main__":
    main()
