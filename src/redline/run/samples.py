"""Generated samples for reports: the same fixed evaluation inputs, every run.

At the end of a run, `save_samples` hands the first `n` evaluation samples (always the
same ones, so runs of a study can be compared input by input) to `Task.samples`, in eval
mode, under no_grad, the precision's autocast and a forked RNG re-seeded with the run's
seed, and writes what comes back to RUN_DIR/samples/: each image as a PNG and
samples.json listing titles, image files, texts and per-sample metrics. The report reads
that directory; nothing here is needed to train.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from redline import batch as batch_tree
from redline.device import DeviceInfo
from redline.errors import writing
from redline.files import atomic_write_bytes, atomic_write_text
from redline.precision import Precision
from redline.task import Sample, Task

INDEX = "samples.json"


def save_samples(task: Task, model: nn.Module, eval_set: Dataset, precision: Precision,
                 device: DeviceInfo, out_dir: str | Path | None, n: int, seed: int
                 ) -> list[Sample]:
    """Run task.samples on the first `n` evaluation inputs and write them (module doc);
    `out_dir` None: run them only (a sharded model's other ranks join its all-gathers)."""
    batch = batch_tree.move(batch_tree.first_samples(eval_set, n), device.torch_device)
    devices = [device.index or 0] if device.is_cuda else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            with precision.forward_context():
                samples = list(task.samples(model, batch))[:n]
    finally:
        model.train()
    if out_dir is not None:
        write_samples(samples, out_dir)
    return samples


def write_samples(samples: list[Sample], out_dir: str | Path) -> None:
    out = Path(out_dir)
    entries = []
    with writing("samples", out):
        out.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(samples):
            images = {}
            for name, image in getattr(sample, "images", {}).items():
                file = f"{i:02d}-{_slug(name)}.png"
                _write_png(image, out / file)
                images[name] = file
            entries.append({"title": str(getattr(sample, "title", f"sample {i}")),
                            "images": images, "texts": dict(getattr(sample, "texts", {})),
                            "metrics": {k: float(v) for k, v in
                                        getattr(sample, "metrics", {}).items()}})
        atomic_write_text(out / INDEX, json.dumps(entries, indent=1), "samples")


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """RUN_DIR/samples/samples.json with each image's path made absolute; [] if none."""
    index = Path(run_dir) / "samples" / INDEX
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())
    for entry in entries:
        entry["images"] = {k: index.parent / v for k, v in entry["images"].items()}
    return entries


def _write_png(image: Any, path: Path) -> None:
    from PIL import Image

    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue(), "sample image")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "image"
