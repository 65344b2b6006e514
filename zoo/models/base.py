"""Pieces shared by the zoo's LightningModules: building the `zoo.nn.RNN` from a config, and the common base class."""

from __future__ import annotations

import os
from typing import IO, Any

import lightning as L
import torch
from torch import Tensor

from zoo.checkpoints import load_checkpoint
from zoo.nn import RNN, get_variant


def rnn_kwargs(variant: str, rnn_options: dict[str, Any] | None, dims: dict[str, int] | None) -> dict[str, Any]:
    """The variant's options for `zoo.nn.RNN`: ``rnn_options``, plus ``max_steps`` from ``dims`` when the variant has
    that option and ``rnn_options`` does not set it."""
    options = dict(rnn_options or {})
    if "max_steps" in get_variant(variant).options and "max_steps" not in options and dims and "max_steps" in dims:
        options["max_steps"] = int(dims["max_steps"])
    return options


def build_rnn(
    variant: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    dropout: float = 0.0,
    bidirectional: bool = False,
    rnn_options: dict[str, Any] | None = None,
    dims: dict[str, int] | None = None,
) -> RNN:
    """A batch-first `zoo.nn.RNN`; its ``max_steps`` (if the variant has one) defaults to ``dims["max_steps"]``."""
    return RNN(
        variant,
        input_size,
        hidden_size,
        num_layers=num_layers,
        batch_first=True,
        dropout=dropout,
        bidirectional=bidirectional,
        **rnn_kwargs(variant, rnn_options, dims),
    )


def require_dims(dims: dict[str, int] | None, *keys: str, model: str) -> dict[str, int]:
    """``dims`` as a dict holding ``keys``; a ValueError naming the missing ones otherwise.

    ``dims`` normally comes from the DataModule through the CLI link ``data.dims -> model.init_args.dims``; a model
    built by hand passes it explicitly.
    """
    missing = [k for k in keys if not dims or k not in dims]
    if missing:
        raise ValueError(
            f"{model} needs dims with {', '.join(keys)} (missing: {', '.join(missing)}); pass dims=... or let the CLI "
            "link them from the DataModule (data.dims)"
        )
    return {k: int(v) for k, v in dims.items()}


class RecurrentModule(L.LightningModule):
    """Base class of the zoo's models: the metric that checkpoints monitor and the recurrent network's settings.

    Subclasses set ``monitor`` (e.g. ``"val/acc"``) and ``monitor_mode`` (``"min"`` or ``"max"``); the CLI points its
    ModelCheckpoint at them, so every task keeps its best checkpoint on its own validation metric.

    A non-finite training loss stops training with a FloatingPointError before its backward pass and optimizer step,
    and the buffers (running statistics) that the step's forward pass updated are put back as they were before it, so
    neither the weights nor the statistics are poisoned (nor a checkpoint saved on the error).
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    _before_step: dict[str, Tensor] | None = None
    _batch_idx: int = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Copy the floating-point buffers (into the same tensors at every step) before the step changes them."""
        self._batch_idx = batch_idx
        buffers = {name: b for name, b in self.named_buffers() if b.is_floating_point()}
        with torch.no_grad():
            if self._before_step is None or self._before_step.keys() != buffers.keys():
                self._before_step = {name: b.detach().clone() for name, b in buffers.items()}
            else:
                for name, b in buffers.items():
                    self._before_step[name].copy_(b)

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop on a non-finite loss, with the buffers as they were before this step (`restore_before_step`)."""
        if bool(torch.isfinite(loss).all()):
            return
        self.restore_before_step()
        raise FloatingPointError(
            f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{self._batch_idx}): training stopped before that step's update; the weights and running statistics are "
            "as before it. Look for non-finite values in that batch, or lower the learning rate or clip gradients."
        )

    def restore_before_step(self) -> None:
        """Put the state that a training step's forward pass changes back as it was before the step: the buffers."""
        if self._before_step is None:
            return
        with torch.no_grad():
            for name, b in self.named_buffers():
                if name in self._before_step:
                    b.copy_(self._before_step[name])

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> RecurrentModule:
        """Lightning's ``load_from_checkpoint``, weights only whatever the source (a URL too): the checkpoint is read
        first with `zoo.checkpoints.load_checkpoint`, whose `CheckpointError` names a missing, corrupt or
        code-carrying file; ``weights_only=False`` is refused."""
        if weights_only is not True:
            raise ValueError("weights_only=False is refused: a full pickle can run code (see SECURITY.md)")
        if not hasattr(checkpoint_path, "read"):
            load_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
        )

    @property
    def variant(self) -> str:
        """The recurrent variant's name."""
        return self.hparams.variant
