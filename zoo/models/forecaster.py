"""`Forecaster`: read a window of past values of every channel, predict the next ``horizon`` values of the targets."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from zoo.data.forecast import CSVForecasting, naive_last_value_metrics

from .base import RecurrentModule, build_rnn, require_dims
from .reports import forecast_figure, publish_figure

PLOTTED_WINDOWS = 4


class Forecaster(RecurrentModule):
    """A recurrent multi-horizon forecaster (ETT and any `zoo.data.forecast.CSVForecasting` CSV).

    Batches are ``(x, y)``: x float (B, window, C), y float (B, horizon, n_targets). The recurrent network reads the
    window; a linear head maps its last output to ``horizon * n_targets`` values. With ``residual`` (NLinear's trick,
    Zeng et al. 2023), the network reads the window relative to its last row and predicts the targets' change from
    their last value, so it is blind to the level (robust to the level shifts of ETT) and a zero head is the naive
    last-value forecast. Trained with MSE; MSE and MAE are
    logged on the normalized scale (``val/mse``, ``val/mae``, ``test/mse``, ``test/mae``, as the ETT literature reports)
    and, at test time, on the original scale (``test/mse_raw``, ``test/mae_raw``) with the DataModule's
    ``target_mean`` / ``target_std``. With a `CSVForecasting` DataModule whose targets are among the inputs (the
    default), the test also logs ``test/naive_mse`` and ``test/naive_mae``, those of the naive last-value forecast
    (`zoo.data.forecast.naive_last_value_metrics`), and writes ``forecast.png`` into the run directory: a few test
    windows evenly spaced over the test split, with the history, truth and forecast of the first target. ``predict``
    (through `zoo.cli`) writes ``predictions.csv``: the forecasts on the original scale beside the actual values
    (`write_predictions`).

    Args:
        variant: a `zoo.nn` variant name.
        hidden_size, num_layers, dropout: of the recurrent network (dropout between layers).
        rnn_options: the variant's own options (``zoo.nn.get_variant(variant).options``).
        residual: read ``x - x[:, -1:]`` and add each target's last input value to the forecast; the head starts at
            zero (the naive forecast).
            The targets' positions among the input channels (``target_index``, saved in checkpoints) come from the
            DataModule's ``target_index`` at ``setup``, or from `set_target_index`.
        dims: ``{"input_size": C, "output_size": n_targets, "horizon": H, "max_steps": window}``, linked from the
            DataModule by the CLI.
    """

    monitor = "val/mse"
    monitor_mode = "min"

    def __init__(
        self,
        variant: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        rnn_options: dict[str, Any] | None = None,
        residual: bool = False,
        dims: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dims = require_dims(dims, "input_size", "output_size", "horizon", model="Forecaster")
        self.horizon, self.n_targets = dims["horizon"], dims["output_size"]
        self.rnn = build_rnn(
            variant,
            dims["input_size"],
            hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            rnn_options=rnn_options,
            dims=dims,
        )
        self.head = nn.Linear(hidden_size, self.horizon * self.n_targets)
        self.register_buffer("target_index", torch.full((self.n_targets,), -1, dtype=torch.long))
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": metric()
                for split in ("val", "test")
                for name, metric in (("mse", MeanSquaredError), ("mae", MeanAbsoluteError))
            }
            | {"test_mse_raw": MeanSquaredError(), "test_mae_raw": MeanAbsoluteError()}
        )
        self._scaler: tuple[Tensor, Tensor] | None = None

    def set_target_index(self, index: list[int]) -> None:
        """Set the positions of the ``n_targets`` target channels among the input channels (for ``residual``)."""
        index = torch.as_tensor(index, dtype=torch.long)
        channels = self.rnn.input_size
        if index.shape != self.target_index.shape or index.min() < 0 or index.max() >= channels:
            raise ValueError(f"target_index must hold {self.n_targets} positions in 0..{channels - 1}, got {index}")
        self.target_index.copy_(index)

    def setup(self, stage: str) -> None:
        """With ``residual``, take ``target_index`` from the DataModule if it has one."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.residual and dm is not None and hasattr(type(dm), "target_index"):
            self.set_target_index(dm.target_index)

    def forward(self, x: Tensor) -> Tensor:
        """The forecast (B, horizon, n_targets) for a window x (B, window, C)."""
        last = None
        if self.hparams.residual:
            if (self.target_index < 0).any():
                raise RuntimeError(
                    "residual=True needs the targets' positions among the inputs: train with a DataModule that has "
                    "target_index (e.g. CSVForecasting) or call set_target_index"
                )
            last = x[:, -1:]
            x = x - last
        out, _ = self.rnn(x)
        pred = self.head(out[:, -1]).view(x.shape[0], self.horizon, self.n_targets)
        return pred if last is None else pred + last[:, :, self.target_index]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.log(f"{split}/loss", loss, on_epoch=True, batch_size=len(y))
        for name in ("mse", "mae"):
            metric = self.metrics[f"{split}_{name}"]
            metric(pred, y)
            self.log(f"{split}/{name}", metric, on_epoch=True, prog_bar=True, batch_size=len(y))
        if split == "test" and self._scaler is not None:
            mean, std = (t.to(pred) for t in self._scaler)
            pred_raw, y_raw = pred * std + mean, y * std + mean
            for name in ("mse_raw", "mae_raw"):
                metric = self.metrics[f"test_{name}"]
                metric(pred_raw, y_raw)
                self.log(f"test/{name}", metric, on_epoch=True, batch_size=len(y))
        return loss

    def on_test_start(self) -> None:
        """Take the target scaler from the DataModule (if it has one) for the original-scale metrics."""
        dm = getattr(self.trainer, "datamodule", None)
        mean, std = getattr(dm, "target_mean", None), getattr(dm, "target_std", None)
        self._scaler = None if mean is None or std is None else (mean, std)

    def _reported_data(self) -> CSVForecasting | None:
        """The trainer's DataModule if it is a `CSVForecasting` whose targets are among the inputs (then the naive
        forecast and the history of a target exist)."""
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, CSVForecasting) and all(t in dm.feature_columns for t in dm.target):
            return dm
        return None

    def on_test_epoch_end(self) -> None:
        """Log the naive last-value forecast's test metrics beside the model's."""
        dm = self._reported_data()
        if dm is not None:
            for name, value in naive_last_value_metrics(dm, "test").items():
                self.log(f"test/naive_{name}", value)

    def on_test_end(self) -> None:
        """Plot a few test windows (history, truth, forecast of the first target) into the run directory."""
        dm = self._reported_data()
        if dm is None or not self.trainer.is_global_zero:
            return
        windows = dm.dataset("test")
        picks = np.unique(np.linspace(0, len(windows) - 1, min(PLOTTED_WINDOWS, len(windows))).round().astype(int))
        x, y = (torch.stack(t) for t in zip(*(windows[int(i)] for i in picks), strict=True))
        was_training = self.training
        self.eval()
        with torch.no_grad():
            pred = self(x.to(self.device)).cpu()
        self.train(was_training)
        target = dm.target_index[0]
        history = x[:, :, target].numpy()
        titles = [f"test window {i + 1} of {len(windows)}" for i in picks]
        fig = forecast_figure(history, y[:, :, 0].numpy(), pred[:, :, 0].float().numpy(), dm.target[0], titles)
        publish_figure(self.trainer, "test/forecast", fig, "forecast.png")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The forecast (B, horizon, n_targets) on the normalized scale."""
        return self(batch[0])

    def write_predictions(self, outputs: Tensor, datamodule: Any, directory: Path) -> list[Path]:
        """Write ``predictions.csv`` into ``directory`` for a `CSVForecasting` DataModule (nothing for another).

        One row per forecast origin (`CSVForecasting.predict_origins`): ``origin_row`` (the 0-based data row of the
        window's last input row), ``origin_date`` (that row's date; only with a date column), then for every target
        ``<t>`` and horizon step ``h`` (1 = the row after the origin) ``<t>_h<h>``, the forecast on the original
        scale, and ``<t>_h<h>_true``, the actual value (empty where unknown: forecasts from ``predict_path``).
        """
        if not isinstance(datamodule, CSVForecasting) or not isinstance(outputs, Tensor):
            return []
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            rank_zero_warn("predictions.csv is written by single-process predict only (each process forecasts a share)")
            return []
        origins = datamodule.predict_origins()
        pred = outputs.detach().float().cpu() * datamodule.target_std + datamodule.target_mean
        if len(pred) > len(origins.rows):
            raise RuntimeError(f"{len(pred)} forecasts for {len(origins.rows)} origins")
        # fewer forecasts than origins: limit_predict_batches kept the first ones, in order
        steps = range(1, self.horizon + 1)
        columns = ["origin_row", *(["origin_date"] if origins.dates is not None else [])]
        for name in datamodule.target:
            columns += [c for h in steps for c in (f"{name}_h{h}", f"{name}_h{h}_true")]
        path = directory / "predictions.csv"
        directory.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for i, row in enumerate(origins.rows[: len(pred)]):
                cells: list[object] = [row, *([origins.dates[i]] if origins.dates is not None else [])]
                for t in range(len(datamodule.target)):
                    for h in range(self.horizon):
                        true = "" if origins.truth is None else f"{float(origins.truth[i, h, t]):.6g}"
                        cells += [f"{float(pred[i, h, t]):.6g}", true]
                writer.writerow(cells)
        return [path]
