"""`Forecaster`: read a window of past values of every channel, predict the next ``horizon`` values of the targets."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from .base import RecurrentModule, build_rnn, require_dims


class Forecaster(RecurrentModule):
    """A recurrent multi-horizon forecaster (ETT and any `zoo.data.forecast.CSVForecasting` CSV).

    Batches are ``(x, y)``: x float (B, window, C), y float (B, horizon, n_targets). The recurrent network reads the
    window; a linear head maps its last output to ``horizon * n_targets`` values. Trained with MSE; MSE and MAE are
    logged on the normalized scale (``val/mse``, ``val/mae``, ``test/mse``, ``test/mae``, as the ETT literature reports)
    and, at test time, on the original scale (``test/mse_raw``, ``test/mae_raw``) with the DataModule's
    ``target_mean`` / ``target_std``.

    Args:
        variant: a `zoo.nn` variant name.
        hidden_size, num_layers, dropout: of the recurrent network (dropout between layers).
        rnn_options: the variant's own options (``zoo.nn.get_variant(variant).options``).
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
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": metric()
                for split in ("val", "test")
                for name, metric in (("mse", MeanSquaredError), ("mae", MeanAbsoluteError))
            }
            | {"test_mse_raw": MeanSquaredError(), "test_mae_raw": MeanAbsoluteError()}
        )
        self._scaler: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """The forecast (B, horizon, n_targets) for a window x (B, window, C)."""
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).view(x.shape[0], self.horizon, self.n_targets)

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

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The forecast (B, horizon, n_targets) on the normalized scale."""
        return self(batch[0])
