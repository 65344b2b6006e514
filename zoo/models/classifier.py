"""`SequenceClassifier`: read a sequence step by step, classify it from the recurrent network's last valid output."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from .base import RecurrentModule, build_rnn, require_dims
from .reports import confusion_figure, publish_figure, publish_table

READOUTS = ("last", "state")


class SequenceClassifier(RecurrentModule):
    """A recurrent sequence classifier (sequential / permuted MNIST, sequential digits, UCR/UEA).

    Batches are ``(x, lengths, y)``: x float (B, T, C) zero-padded, lengths long (B,), y long (B,). At the end of
    ``test`` the run directory gets ``confusion_matrix.png``, ``confusion_matrix.csv`` and ``per_class_accuracy.csv``
    (see `zoo.models.reports`); class names come from the DataModule's ``class_labels`` where it has them.
    ``predict`` (through `zoo.cli`) writes ``predictions.csv``: the class probabilities of every sequence
    (`write_predictions`).

    Args:
        variant: a `zoo.nn` variant name.
        hidden_size, num_layers, dropout, bidirectional: of the recurrent network (dropout between layers).
        readout: ``"last"`` classifies from the output at each sequence's last valid step (for a bidirectional
            network: the forward direction's output there and the backward direction's output at t = 0, where it has
            read the whole sequence); ``"state"`` from the top layer's final hidden state h_n (both directions).
            The two agree for the forward direction.
        rnn_options: the variant's own options (``zoo.nn.get_variant(variant).options``), e.g. ``{"init_noise": 0.1}``.
        dims: ``{"input_size": C, "num_classes": K, "max_steps": T}``, linked from the DataModule by the CLI.
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self,
        variant: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        readout: str = "last",
        rnn_options: dict[str, Any] | None = None,
        dims: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.save_hyperparameters()
        dims = require_dims(dims, "input_size", "num_classes", model="SequenceClassifier")
        self.rnn = build_rnn(
            variant, dims["input_size"], hidden_size, num_layers, dropout, bidirectional, rnn_options, dims
        )
        dirs = 2 if bidirectional else 1
        self.head = nn.Linear(hidden_size * dirs, dims["num_classes"])
        self.metrics = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(dims["num_classes"], average="micro") for s in ("train", "val", "test")}
        )
        self.confusion = MulticlassConfusionMatrix(dims["num_classes"])

    def features(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The (B, H * directions) summary of each sequence that the head classifies."""
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        out, state = self.rnn(x, lengths=lengths)
        h_n = state if isinstance(state, Tensor) else state[0]
        dirs = self.rnn.num_directions
        if self.hparams.readout == "state":
            return torch.cat(list(h_n[-dirs:]), dim=-1)
        hidden = self.hparams.hidden_size
        rows = torch.arange(x.shape[0], device=x.device)
        last = out[rows, lengths.to(x.device) - 1, :hidden]
        if dirs == 1:
            return last
        return torch.cat([last, out[:, 0, hidden:]], dim=-1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, K) for a batch x (B, T, C) with valid lengths (B,) (all T if None)."""
        return self.head(self.features(x, lengths))

    def _step(self, batch: tuple[Tensor, Tensor, Tensor], split: str) -> Tensor:
        x, lengths, y = batch
        logits = self(x, lengths)
        loss = F.cross_entropy(logits, y)
        metric = self.metrics[f"{split}_acc"]
        metric(logits, y)
        on_step = split == "train"
        log = {"on_epoch": True, "prog_bar": True, "batch_size": len(y), "sync_dist": True}  # mean over ranks
        self.log(f"{split}/loss", loss, on_step=on_step, **log)
        self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        if split == "test":
            self.confusion.update(logits, y)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        """Write the test confusion matrix (PNG and CSV) and the per-class accuracy (CSV) into the run directory."""
        matrix = self.confusion.compute().cpu().numpy()  # summed over the processes
        if not self.trainer.is_global_zero:
            return
        labels = getattr(getattr(self.trainer, "datamodule", None), "class_labels", None) or []
        if len(labels) != len(matrix):
            labels = [str(k) for k in range(len(matrix))]
        support, correct = matrix.sum(axis=1), matrix.diagonal()
        trainer = self.trainer
        publish_figure(trainer, "test/confusion_matrix", confusion_figure(matrix, labels), "confusion_matrix.png")
        counts = [[label, *map(int, row)] for label, row in zip(labels, matrix, strict=True)]
        publish_table(trainer, "test/confusion_counts", ["true/predicted", *labels], counts, "confusion_matrix.csv")
        per_class = [
            [label, int(n), int(c), f"{c / n:.4f}" if n else "nan"]
            for label, n, c in zip(labels, support, correct, strict=True)
        ]
        columns = ["class", "samples", "correct", "accuracy"]
        publish_table(trainer, "test/per_class_accuracy", columns, per_class, "per_class_accuracy.csv")

    def on_predict_epoch_start(self) -> None:
        self._probabilities: list[Tensor] = []
        self._labels: list[Tensor] = []

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """Predicted class ids (B,); the class probabilities (and the labels, if the batch has them) are kept for
        `write_predictions`."""
        x, lengths = batch[0], batch[1]
        probabilities = self(x, lengths).float().softmax(-1)
        self._probabilities.append(probabilities.cpu())
        if len(batch) > 2:
            self._labels.append(batch[2].cpu())
        return probabilities.argmax(-1)

    def write_predictions(self, outputs: Tensor, datamodule: Any, directory: Path) -> list[Path]:
        """Write ``predictions.csv`` into ``directory``: one row per predicted sequence, in order: ``index``, the
        probability of every class (``p_<class>``), ``predicted`` (the most likely class) and, where the predict
        batches carry labels, ``true``. Class names come from the DataModule's ``class_labels`` where it has them."""
        probabilities = getattr(self, "_probabilities", None)
        if not probabilities:
            return []
        if self._trainer is not None and self._trainer.world_size > 1:
            rank_zero_warn("predictions.csv is written by single-process predict only (each process predicts a share)")
            return []
        probs = torch.cat(probabilities)
        labels = getattr(datamodule, "class_labels", None) or []
        if len(labels) != probs.shape[1]:
            labels = [str(k) for k in range(probs.shape[1])]
        truth = torch.cat(self._labels) if len(self._labels) == len(probabilities) else None
        path = directory / "predictions.csv"
        directory.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["index", *(f"p_{label}" for label in labels), "predicted", *(["true"] if truth is not None else [])]
            )
            for i, row in enumerate(probs.tolist()):
                best = max(range(len(row)), key=row.__getitem__)
                true = [labels[int(truth[i])]] if truth is not None else []
                writer.writerow([i, *(f"{p:.6f}" for p in row), labels[best], *true])
        return [path]
