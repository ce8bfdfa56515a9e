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
          log_y: bool = False, references: Series | None = None) -> str | None:
    """Overlaid curves, one per label; None when there is nothing to draw. A series of one
    point is drawn as a point; `references` (e.g. a task's baseline of the metric) as
    dashed grey lines. The axes start at the data, never at a degenerate range, and a
    log axis labels its ticks as plain numbers."""
    series, references = _finite(series), _finite(references or {})
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.3))
    for label, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, linewidth=1.4, marker="o" if len(xs) < 4 else None,
                markersize=5)
    for label, points in references.items():
        xs, ys = zip(*points, strict=True)
        if len(set(ys)) == 1:  # a constant baseline: one line across the plot
            ax.axhline(ys[0], color="#6b7280", linestyle="--", linewidth=1.2, label=label)
        else:
            ax.plot(xs, ys, color="#6b7280", linestyle="--", linewidth=1.2, label=label)
    values = [y for v in (*series.values(), *references.values()) for _, y in v]
    if log_y and all(y > 0 for y in values):
        _log_axis(ax, min(values), max(values))
    _sane_limits(ax, [x for v in series.values() for x, _ in v], values)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _encode(fig)


def _finite(series: Series) -> dict[str, list[tuple[float, float]]]:
    # metrics.jsonl writes a non-finite value as a string ("NaN"): not a point to draw
    kept = {k: [(x, y) for x, y in v if isinstance(y, (int, float)) and math.isfinite(y)]
            for k, v in series.items()}
    return {k: v for k, v in kept.items() if v}


def _log_axis(ax: Any, low: float, high: float) -> None:
    """A log y axis whose ticks read as numbers (0.5, 1, 2), not as 5x10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    if high / low < 100:  # under two decades: label 1-2-5 steps between the powers of ten
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _sane_limits(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Limits around a single step or a single value, which matplotlib would draw as a
    sliver of +-0.05 around it."""
    if xs and max(xs) == min(xs):
        x = xs[0]
        ax.set_xlim(0 if x > 0 else x - 1, x * 1.05 + 1 if x > 0 else x + 1)
    if ys and max(ys) == min(ys):
        y = ys[0]
        pad = abs(y) * 0.1 or 1.0
        if ax.get_yscale() == "log":
            ax.set_ylim(y / 1.5, y * 1.5)
        else:
            ax.set_ylim(y - pad, y + pad)


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
