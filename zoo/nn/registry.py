"""The registry of variants: the names that configs and published checkpoints use."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

from .cells import (
    BNIndRNNCell,
    BNLSTMCell,
    GRUCell,
    LNGRUCell,
    LNLSTMCell,
    LSTMCell,
    RecurrentCell,
    RMSGRUCell,
    RMSLSTMCell,
    SeqBNLSTMCell,
    WeightNormLSTMCell,
)

_BA = "Ba et al. 2016, arXiv:1607.06450"
_RMS = "Zhang & Sennrich 2019, arXiv:1910.07467"
_FIXED = ("self", "input_size", "hidden_size", "bias")


@dataclass(frozen=True)
class Variant:
    """A registered recurrent variant."""

    name: str
    description: str
    paper: str
    cell: type[RecurrentCell]

    @property
    def options(self) -> dict[str, Any]:
        """The variant's own options (keyword arguments beyond the layer's) with their defaults."""
        params = inspect.signature(self.cell.__init__).parameters
        return {k: p.default for k, p in params.items() if k not in _FIXED}


_REGISTRY: dict[str, Variant] = {}


def register_variant(name: str, description: str, paper: str, cell: type[RecurrentCell]) -> Variant:
    """Add a variant under ``name`` (which must be new) and return it."""
    if name in _REGISTRY:
        raise ValueError(f"variant {name!r} is already registered")
    _REGISTRY[name] = Variant(name, description, paper, cell)
    return _REGISTRY[name]


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError naming the known ones (and the closest) otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown variant {name!r}.{hint} Known variants: {', '.join(_REGISTRY)}") from None


def list_variants() -> list[Variant]:
    """All registered variants, in registration order."""
    return list(_REGISTRY.values())


for _args in [
    ("lstm", "plain LSTM, equal to torch.nn.LSTM (runs its kernel)", "Hochreiter & Schmidhuber 1997", LSTMCell),
    ("gru", "plain GRU, equal to torch.nn.GRU (runs its kernel)", "Cho et al. 2014", GRUCell),
    (
        "bn_lstm",
        "recurrent batch norm: BN of W_x x, W_h h and c_t, per-time-step statistics (or shared; or input only)",
        "Cooijmans et al. 2016, arXiv:1603.09025",
        BNLSTMCell,
    ),
    (
        "seqbn_lstm",
        "sequence-wise batch norm of the input term only, statistics over batch x time",
        "Laurent et al. 2016, arXiv:1510.01378; Amodei et al. 2016",
        SeqBNLSTMCell,
    ),
    ("ln_lstm", "layer norm of W_x x, W_h h and c_t", _BA, LNLSTMCell),
    (
        "ln_gru",
        "layer-normalized GRU (four LNs, in the official code's positions)",
        "Ba et al. 2016, arXiv:1607.06450",
        LNGRUCell,
    ),
    (
        "rms_lstm",
        "RMSNorm in the layer-norm positions of ln_lstm",
        "Zhang & Sennrich 2019, arXiv:1910.07467",
        RMSLSTMCell,
    ),
    ("rms_gru", "RMSNorm in the layer-norm positions of ln_gru", _RMS, RMSGRUCell),
    (
        "wn_lstm",
        "weight normalization of the rows of W_x and W_h",
        "Salimans & Kingma 2016, arXiv:1602.07868",
        WeightNormLSTMCell,
    ),
    (
        "bn_indrnn",
        "independently recurrent ReLU network with batch norm, |u| bounded",
        "Li et al. 2018, arXiv:1803.04831",
        BNIndRNNCell,
    ),
]:
    register_variant(*_args)
