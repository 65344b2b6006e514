"""Pieces shared by the zoo's LightningModules: building the `zoo.nn.RNN` from a config, and the common base class."""

from __future__ import annotations

import os
from typing import IO, Any

import lightning as L

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
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"

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
