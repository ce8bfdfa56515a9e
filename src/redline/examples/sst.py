"""`sst-tiny`: next-month sea-surface temperature from the previous months, on real data.

The data are the real OSTIA monthly analyses (Met Office) that the `iris-sample-data`
package ships: 54 months, April 2006 to September 2010, an equatorial band 5 S to 5 N
(18 x 432 points, 0.56 x 0.83 degrees), in kelvin, land as NaN (~26 % of the points). No
download: the file is read with xarray from the installed package.

The split is by time, honestly: the model and the monthly climatology learn from the
targets up to `train_until` (default March 2009: about three years); evaluation forecasts
every later month (April 2009 to September 2010, 18 months) from the months before it.
With so little data the task is small on purpose, and its numbers say so.

Inputs are anomalies (each month minus the training years' mean for its calendar month),
scaled by their training standard deviation: `history` months (default 3), land set to 0.
The model is a small transformer over spatial patches (patch x patch points): patch
embedding, learned positions, `depth` encoder layers, a linear head back to the patch's
points. It predicts the change from the last month (persistence plus a learned
correction). Training windows are 144 longitudes wide at 108 offsets 4 longitudes apart
(wrapping round the globe), so one month gives 108 overlapping samples; evaluation covers
the whole band in 3 windows. The model is small on purpose (width 32): at width 64 it
overfit the three training years and fell behind persistence by 1000 steps.
Land is masked out of the loss and the metrics.

Metrics, over the evaluation months' ocean points: RMSE in kelvin, and the anomaly
correlation coefficient (ACC: the correlation of forecast and observed anomalies, per
month, averaged), each beside the persistence forecast (next month = this month) and the
monthly climatology (anomaly 0) computed on the same months.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from redline.errors import MissingExtra
from redline.task import Sample, TaskBase, TaskError

WINDOW = 144  # longitudes per sample (a third of the globe)
OFFSETS = 108  # training windows per month, 4 longitudes apart


@functools.cache
def load_ostia() -> tuple[np.ndarray, np.ndarray]:
    """(sst [months, lat, lon] float32 kelvin with NaN on land, month starts as
    numpy datetime64[M]) from iris-sample-data's ostia_monthly.nc."""
    try:
        import iris_sample_data
        import xarray as xr
    except ImportError as e:
        raise MissingExtra("sst-tiny's data", e.name or "xarray", "examples") from e
    path = Path(iris_sample_data.__file__).parent / "sample_data" / "ostia_monthly.nc"
    with xr.open_dataset(path, engine="netcdf4") as ds:
        sst = ds["surface_temperature"].values.astype(np.float32)
        months = ds["time"].values.astype("datetime64[M]")
    return sst, months


class _Windows(Dataset):
    """(inputs [history, 18, WINDOW], target [18, WINDOW], ocean mask) per sample."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                 offsets: list[int]) -> None:
        self.x, self.y, self.mask, self.offsets = x, y, mask, offsets

    def __len__(self) -> int:
        return len(self.y) * len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        month, offset = divmod(i, len(self.offsets))
        cols = (np.arange(WINDOW) + self.offsets[offset]) % self.y.shape[-1]
        return {"x": torch.from_numpy(self.x[month][..., cols]),
                "y": torch.from_numpy(self.y[month][..., cols]),
                "mask": torch.from_numpy(self.mask[..., cols]),
                "month": torch.tensor(month), "col": torch.tensor(self.offsets[offset])}


class PatchTransformer(nn.Module):
    """Patches of the input months -> transformer encoder -> the change at each point."""

    def __init__(self, history: int, patch: int, width: int, depth: int, heads: int,
                 shape: tuple[int, int] = (18, WINDOW)) -> None:
        super().__init__()
        self.patch, self.shape = patch, shape
        tokens = (shape[0] // patch) * (shape[1] // patch)
        self.embed = nn.Conv2d(history, width, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, patch * patch)
        nn.init.normal_(self.position, std=0.02)
        nn.init.zeros_(self.head.weight)  # starts as persistence
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.patch
        h, w = self.shape[0] // p, self.shape[1] // p
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position
        out = self.head(self.encoder(tokens))  # [b, h*w, p*p]
        change = out.view(b, h, w, p, p).permute(0, 1, 3, 2, 4).reshape(b, h * p, w * p)
        return x[:, -1] + change


class SSTTask(TaskBase):
    """Forecast next month's SST anomaly field from the previous `history` months."""

    name = "sst-tiny"

    def __init__(self, history: int = 3, patch: int = 6, width: int = 32, depth: int = 2,
                 heads: int = 4, train_until: str = "2009-03") -> None:
        for key, value, ok in (("history", history, 1 <= history <= 12),
                               ("patch", patch, patch in (2, 3, 6, 9, 18)),
                               ("width", width, width >= heads and width % heads == 0),
                               ("depth", depth, depth >= 1), ("heads", heads, heads >= 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not ok:
                raise TaskError(f"sst-tiny: task_args.{key}={value!r} is out of range "
                                "(patch must divide 18 and 144; width a multiple of heads)")
        sst, months = load_ostia()
        try:
            until = np.datetime64(train_until, "M")
        except ValueError:
            raise TaskError(f"sst-tiny: task_args.train_until={train_until!r} is not a "
                            "YYYY-MM month") from None
        targets = np.arange(history, len(months))
        train = targets[months[targets] <= until]
        if len(train) < 12 or len(train) == len(targets):
            raise TaskError(f"sst-tiny: train_until {train_until} leaves {len(train)} training "
                            f"and {len(targets) - len(train)} evaluation months; choose a "
                            "month between 2007-06 and 2010-08")
        self.history, self.patch, self.width, self.depth, self.heads = (
            history, patch, width, depth, heads)
        self.months = months
        self.ocean = ~np.isnan(sst).any(axis=0)
        calendar = months.astype(int) % 12
        # the climatology and the scale come from the training targets' months only
        with warnings.catch_warnings():  # land points are NaN in every month: mean of none
            warnings.simplefilter("ignore", RuntimeWarning)
            self.climatology = np.stack([
                np.nanmean(sst[train][calendar[train] == m], axis=0)
                if (calendar[train] == m).any() else np.nanmean(sst, 0)
                for m in range(12)]).astype(np.float32)
        anomaly = np.nan_to_num(sst - self.climatology[calendar], nan=0.0)
        self.scale = float(anomaly[train][:, self.ocean].std())
        a = (anomaly / self.scale).astype(np.float32)
        self._x = {"train": np.stack([a[t - history:t] for t in train]),
                   "eval": np.stack([a[t - history:t] for t in targets[len(train):]])}
        self._y = {"train": a[train], "eval": a[targets[len(train):]]}
        self.train_months, self.eval_months = months[train], months[targets[len(train):]]
        self.mask = self.ocean.astype(np.float32)

    def build_model(self) -> nn.Module:
        return PatchTransformer(self.history, self.patch, self.width, self.depth, self.heads)

    def train_data(self) -> Dataset:
        return _Windows(self._x["train"], self._y["train"], self.mask,
                        [k * (432 // OFFSETS) for k in range(OFFSETS)])

    def eval_data(self) -> Dataset:
        return _Windows(self._x["eval"], self._y["eval"], self.mask, [0, WINDOW, 2 * WINDOW])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["mask"]
        error = (model(batch["x"]).float() - batch["y"]) ** 2
        return (error * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """RMSE (K) and ACC of the model, persistence and climatology on the same points."""
        preds: dict[str, list[torch.Tensor]] = {"": [], "_persistence": [], "_climatology": []}
        truth, masks, months = [], [], []
        for batch in loader:
            device = next(model.parameters()).device
            x = batch["x"].to(device)
            preds[""].append(model(x).float().cpu())
            preds["_persistence"].append(batch["x"][:, -1])
            preds["_climatology"].append(torch.zeros_like(batch["y"]))
            truth.append(batch["y"])
            masks.append(batch["mask"].bool())
            months.append(batch["month"])
        if not truth:
            return {}
        y, m, month = torch.cat(truth), torch.cat(masks), torch.cat(months)
        metrics = {}
        for suffix, p in preds.items():
            p = torch.cat(p)
            metrics["rmse" + suffix] = self.scale * float(((p - y)[m] ** 2).mean().sqrt())
            metrics["acc" + suffix] = _acc(p, y, m, month)
        return metrics

    @torch.no_grad()
    def samples(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[Sample]:
        """Maps of the last input month, the forecast, the truth and the error (anomalies in
        kelvin, blue cold, red warm; land grey), with the map's RMSE."""
        device = next(model.parameters()).device
        forecast = model(batch["x"].to(device)).float().cpu()
        out = []
        for i in range(forecast.shape[0]):
            month = self.eval_months[int(batch["month"][i])] if len(self.eval_months) > int(
                batch["month"][i]) else None
            mask = batch["mask"][i].bool()
            maps = {"last input month": batch["x"][i, -1], "forecast": forecast[i],
                    "truth": batch["y"][i], "error": forecast[i] - batch["y"][i]}
            rmse = self.scale * float(((forecast[i] - batch["y"][i])[mask] ** 2).mean().sqrt())
            col = int(batch["col"][i])
            out.append(Sample(
                title=f"{month} from longitude {col * 360 / 432:.0f} E",
                images={k: _colour(v * self.scale, mask) for k, v in maps.items()},
                metrics={"rmse_k": rmse}))
        return out


def _acc(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor,
         month: torch.Tensor) -> float:
    """Anomaly correlation per evaluation month (over its ocean points), averaged."""
    values = []
    for m in month.unique():
        sel = month == m
        p, t = pred[sel][mask[sel]], truth[sel][mask[sel]]
        p, t = p - p.mean(), t - t.mean()
        denom = (p.norm() * t.norm()).clamp(min=1e-12)
        values.append(float((p * t).sum() / denom))
    return float(np.mean(values))


def _colour(anomaly: torch.Tensor, mask: torch.Tensor, limit: float = 1.5) -> np.ndarray:
    """An anomaly map in kelvin as RGB in [0, 1]: blue-white-red over ±limit, land grey,
    each point repeated 3x3 so the thin band is visible."""
    v = (anomaly.clamp(-limit, limit) / limit).numpy()
    rgb = np.stack([np.clip(1 + np.minimum(v, 0), 0, 1), 1 - np.abs(v),
                    np.clip(1 - np.maximum(v, 0), 0, 1)], axis=-1)
    rgb[~mask.numpy()] = 0.6
    return np.repeat(np.repeat(rgb, 3, axis=0), 3, axis=1).astype(np.float32)

