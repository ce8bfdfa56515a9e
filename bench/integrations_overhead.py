"""What monitoring costs inside Lightning and the Hugging Face Trainer, per step.

    PYTHONPATH=src python bench/integrations_overhead.py [--repeats 7] [--steps 200]
        [--threads 1] [--width 512] [--batch 64]

Lightning, one LightningModule (an MLP, AdamW), each variant a fresh `Trainer.fit` of
`steps` + 1 steps, timed between the first and the last `on_train_batch_end` (start-up
excluded):

  plain           no callback, logger=False: the floor
  redline         RedlineCallback (jsonl, log_every=50): windows, writer process, sampler
  lightning-mon   Lightning's ThroughputMonitor + DeviceStatsMonitor (its own monitoring;
                  ThroughputMonitor synchronises every batch on a GPU), with a CSVLogger

Hugging Face, a GPT-2 of 2 layers built from a config, `Trainer.train` of `steps` steps
per variant, timed between the first and last `on_step_end`:

  hf-plain        report_to=[], logging_steps=steps (the Trainer's own bookkeeping only)
  hf-redline      + RedlineCallback (jsonl, log_every=50)
  hf-logging      logging_steps=1: the Trainer's own per-step logging (its loss and grad
                  norm read to the host each step; nothing printed: PrinterCallback removed)

Variants run in a random order in each repeat; a variant's cost is the median over repeats
of its per-step time over the floor's in the same repeat, with the min..max of those ratios.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _stamps_callback(base: type, hook: str) -> Any:
    class Stamps(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            self.times: list[float] = []

        def stamp(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter())

        def per_step(self) -> float:
            return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    setattr(Stamps, hook, Stamps.stamp)
    return Stamps()


def lightning_variants(width: int, batch: int, steps: int, tmp: Path
                       ) -> dict[str, Callable[[], float]]:
    import lightning as L
    from lightning.pytorch.callbacks import DeviceStatsMonitor, ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from redline.integrations.lightning import RedlineCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    data = [(torch.randn(batch, width), torch.randn(batch, width)) for _ in range(8)]

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))

        def training_step(self, b: Any, i: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(b[0]), b[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=True)

    module = MLP()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                       torch.cat([y for _, y in data])), batch_size=batch)

    def fit(callbacks: list[Any], logger: Any = False) -> float:
        stamps = _stamps_callback(L.Callback, "on_train_batch_end")
        trainer = L.Trainer(max_steps=steps + 1, accelerator="cpu", devices=1, logger=logger,
                            enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=str(tmp),
                            limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[*callbacks, stamps])
        trainer.fit(module, loader)
        return stamps.per_step()

    counter = iter(range(10**6))

    def throughput() -> ThroughputMonitor:
        return ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0])

    return {
        "plain": lambda: fit([]),
        "redline": lambda: fit([RedlineCallback(tmp / f"lit-{next(counter)}", log_every=50)]),
        "lightning-mon": lambda: fit([throughput(), DeviceStatsMonitor()],
                                     CSVLogger(str(tmp), name=f"csv-{next(counter)}")),
    }


def hf_variants(steps: int, tmp: Path) -> dict[str, Callable[[], float]]:
    import transformers

    from redline.integrations.transformers import RedlineCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=64))
    ids = torch.randint(0, 256, (4096, 64))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i]}

    counter = iter(range(10**6))

    def train(callbacks: list[Any], logging_steps: int) -> float:
        stamps = _stamps_callback(transformers.TrainerCallback, "on_step_end")
        args = transformers.TrainingArguments(
            output_dir=str(tmp / f"hf-{next(counter)}"), max_steps=steps,
            per_device_train_batch_size=16, logging_steps=logging_steps, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                       callbacks=[*callbacks, stamps])
        trainer.remove_callback(transformers.PrinterCallback)  # no terminal output: its cost
        trainer.train()                                        # would swamp the comparison
        return stamps.per_step()

    return {
        "hf-plain": lambda: train([], steps),
        "hf-redline": lambda: train([RedlineCallback(tmp / f"hfr-{next(counter)}",
                                                     log_every=50)], steps),
        "hf-logging": lambda: train([], 1),
    }


def bench(name: str, variants: dict[str, Callable[[], float]], floor: str,
          repeats: int) -> None:
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        for k in order:
            times[k].append(variants[k]())
    base = statistics.median(times[floor])
    print(f"\n{name}: floor ({floor}) {1e3 * base:.2f} ms/step, {repeats} repeats")
    print(f"{'variant':<15} {'ms/step':>8} {'vs floor':>9} {'min..max':>18}")
    for k, ts in times.items():
        ratios = sorted(t / f for t, f in zip(ts, times[floor], strict=True))
        print(f"{k:<15} {1e3 * statistics.median(ts):>8.2f} "
              f"{100 * (statistics.median(ratios) - 1):>+8.1f}% "
              f"{100 * (ratios[0] - 1):>+8.1f}%..{100 * (ratios[-1] - 1):+.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only", choices=("lightning", "hf"), default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.steps} steps a fit")
    with tempfile.TemporaryDirectory(prefix="redline-integrations-") as tmp:
        if args.only in (None, "lightning"):
            bench(f"Lightning, MLP {args.width}, batch {args.batch}",
                  lightning_variants(args.width, args.batch, args.steps, Path(tmp)), "plain",
                  args.repeats)
        if args.only in (None, "hf"):
            bench("HF Trainer, GPT-2 (2 layers, 128 wide), batch 16 x 64 tokens",
                  hf_variants(args.steps, Path(tmp)), "hf-plain", args.repeats)


if __name__ == "__main__":
    main()
