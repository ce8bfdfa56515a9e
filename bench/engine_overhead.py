"""Engine.step against a bare PyTorch loop: what does redline's step cost?

    python bench/engine_overhead.py [--repeats 7] [--steps 50] [--threads 1]

Both loops run the same model, data and AdamW; the bare loop is the floor
(zero_grad, forward, backward, clip_grad_norm_, step). Variants are interleaved
within each repeat so drift and noise hit all of them alike; the table gives the
median time per optimizer step, the spread (min..max of the repeats) and the ratio
to the floor. Two sizes: an MLP whose bare step takes ~2 ms and one of ~30 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from redline.engine import Engine


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def make_variants(width: int, batch: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    variants: dict[str, Callable[[], None]] = {}

    bare = _mlp(width)
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, foreach=True)

    def bare_step() -> None:
        bare_opt.zero_grad(set_to_none=True)
        _loss(bare, (x, y)).backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0, foreach=True)
        bare_opt.step()

    variants["bare loop (floor)"] = bare_step
    for label, micro, guard in (("Engine.step", None, False),
                                ("Engine.step + OOM guard", batch, True),
                                ("Engine.step, 2 micro-batches", batch // 2, False)):
        model = _mlp(width)
        engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
                        "fp32", grad_clip=1.0, micro_batch_size=micro, oom_guard=guard)
        variants[label] = lambda e=engine: e.step((x, y), _loss)  # type: ignore[misc]
    return variants


def measure(variants: dict[str, Callable[[], None]], steps: int, repeats: int
            ) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: allocator, oneDNN kernels
        for _ in range(5):
            fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats x "
          f"{args.steps} steps, interleaved\n")
    print("| model | variant | median ms/step | spread (min..max) | vs floor |")
    print("|---|---|---|---|---|")
    for label, width, batch in (("MLP 128, batch 64", 128, 64),
                                ("MLP 512, batch 192", 512, 192)):
        times = measure(make_variants(width, batch), args.steps, args.repeats)
        floor = statistics.median(times["bare loop (floor)"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {label} | {name} | {med * 1e3:.3f} | {min(ts) * 1e3:.3f}..{max(ts) * 1e3:.3f}"
                  f" | {med / floor:.3f}x |")


if __name__ == "__main__":
    main()
