"""The report's figures, drawn with matplotlib (Agg) and embedded as PNG data URIs.

Every function takes plain data (lists of points, rows of statistics) and returns a
`data:image/png;base64,...` string, so the HTML needs nothing from the network.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Series = Mapping[str, Sequence[tuple[float, float]]]  # label -> [(x, y), ...]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; safe in any thread-less process
    import matplotlib.pyplot as plt

    return plt


def _encode(fig: Any) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_uri(path: str | Path) -> str:
    """A PNG file as a data URI (a sample's image)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def lines(series: Series, title: str, xlabel: str = "step", ylabel: str = "",
          log_y: bool = False) -> str | None:
    """Overlaid curves, one per label; None when there is nothing to draw."""
    # metrics.jsonl writes a non-finite value as a string ("NaN"): not a point to draw
    series = {k: [(x, y) for x, y in v if isinstance(y, (int, float)) and math.isfinite(y)]
              for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for label, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, linewidth=1.4, marker="o" if len(xs) < 4 else None)
    if log_y and all(y > 0 for v in series.values() for _, y in v):
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _encode(fig)


def heatmap(rows: Sequence[Mapping[str, Any]], value: str, title: str,
            kind: str = "grad") -> str | None:
    """A layer x step heat map of log10(`value`) over stats rows of `kind`."""
    rows = [r for r in rows if r["kind"] == kind and isinstance(r.get(value), (int, float))]
    if not rows:
        return None
    import numpy as np

    tensors = list(dict.fromkeys(r["tensor"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    grid = np.full((len(tensors), len(steps)), np.nan)
    for r in rows:
        v = r[value]
        grid[tensors.index(r["tensor"]), steps.index(r["step"])] = (
            math.log10(v) if v and v > 0 and math.isfinite(v) else np.nan)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, max(2.4, 0.16 * len(tensors) + 1.2)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(tensors)), tensors, fontsize=6 if len(tensors) > 20 else 8)
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
    ax.set(title=title, xlabel="step")
    fig.colorbar(image, ax=ax, label=f"log10 {value}")
    return _encode(fig)


def bars(values: Mapping[str, float], title: str, ylabel: str = "") -> str | None:
    """One bar per label (e.g. each setting's samples/s)."""
    values = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    ax.bar(list(values), list(values.values()), color="#3b6ea8")
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _encode(fig)
