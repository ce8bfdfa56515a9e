"""What small things cost inside a training step: the evidence behind telemetry's design.

    PYTHONPATH=src python bench/step_costs.py [--repeats 151] [--size 128x160]

A bare loop (zero_grad, forward, backward, clip_grad_norm_, AdamW step) on one shared MLP,
and the same loop plus one bookkeeping choice per variant. Each repeat runs every variant
for 50 steps in a random order; the cost of a variant is the median over repeats of its
block time divided by the floor's block time in the same repeat, with a distribution-free
95 % confidence interval (as in bench/overhead.py). The variants are what a telemetry
hot path could do with the step's loss and gradient norm:

  keep tensors    append both to a list, stacked and summed every 50 steps
  .item()         read both on the host with Tensor.item(): no sync on CPU (redline's
                  CPU path, metrics.WindowLogger.record)
  stack into row  torch.stack((loss, norm), out=row): one op into preallocated memory
  pipe write      one ~0.6 KB JSON line every 50 steps to a child process that blocks
                  in a read (redline's hand-off to its writer process)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pairs import FLOOR, Variant, _bare, paired
from workloads import Workload, mlp

READER = "import sys, json\nfor line in sys.stdin: json.loads(line)"


def variants(w: Workload) -> dict[str, Variant]:
    kept: list[torch.Tensor] = []
    total = [0.0]
    rows = torch.zeros(50, 2).unbind(0)

    def keep(i: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        kept.extend((loss, norm))
        if i % 50 == 0:
            total[0] += float(torch.stack(kept).sum())
            kept.clear()

    def item(i: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        total[0] += loss.item() + norm.item()

    def row(i: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        torch.stack((loss, norm), out=rows[i % 50])

    child = subprocess.Popen([sys.executable, "-c", READER], stdin=subprocess.PIPE)
    assert child.stdin is not None
    fd = child.stdin.fileno()
    os.set_blocking(fd, False)
    line = (json.dumps({f"metric_{i}": i / 7 for i in range(25)}) + "\n").encode()

    def pipe(i: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        if i % 50 == 25:
            os.write(fd, line)

    out = {FLOOR: _bare(w), "bare loop again (noise control)": _bare(w)}
    for name, extra in (("keep tensors", keep), (".item()", item), ("stack into row", row),
                        ("pipe write", pipe)):
        out[name] = _bare(w, after=extra)
    out["pipe write"].close = lambda: (child.stdin.close(), child.wait())  # type: ignore
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=151)
    p.add_argument("--size", default="128x160", help="WIDTHxBATCH (floor ~2 ms)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    width, bs = (int(x) for x in args.size.split("x"))
    vs = variants(mlp(width, bs, f"MLP {width}, batch {bs}"))
    names = list(vs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for v in vs.values():
        v.block(25)
    order, t0 = random.Random(0), time.perf_counter()
    for _ in range(args.repeats):
        for name in order.sample(names, len(names)):
            times[name].append(vs[name].block(50))
    for v in vs.values():
        v.close()
    floor = sorted(times[FLOOR])[len(times[FLOOR]) // 2]
    print(f"MLP {width}, batch {bs}, 1 thread, {args.repeats} repeats x 50 steps, "
          f"{time.perf_counter() - t0:.0f} s\n\n| variant | vs floor, paired (95 % CI) | "
          "per step |\n|---|---|---|")
    for name in names:
        r, lo, hi = paired(times, name)
        print(f"| {name} | {r:.4f}x ({lo:.4f}..{hi:.4f}) | {(r - 1) * floor * 1e6:+.1f} us |")


if __name__ == "__main__":
    main()
