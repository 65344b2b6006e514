"""Normalized recurrent layers in plain PyTorch (no Lightning import).

>>> import zoo.nn
>>> rnn = zoo.nn.RNN("bn_lstm", 8, 16, num_layers=2, batch_first=True, max_steps=50)
"""

from . import backends
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
from .norm import MaskedBatchNorm
from .registry import Variant, get_variant, list_variants, register_variant
from .rnn import RNN, lengths_to_mask, reverse_padded

__all__ = [
    "RNN",
    "backends",
    "BNIndRNNCell",
    "BNLSTMCell",
    "GRUCell",
    "LNGRUCell",
    "LNLSTMCell",
    "LSTMCell",
    "MaskedBatchNorm",
    "RMSGRUCell",
    "RMSLSTMCell",
    "RecurrentCell",
    "SeqBNLSTMCell",
    "Variant",
    "WeightNormLSTMCell",
    "get_variant",
    "lengths_to_mask",
    "list_variants",
    "register_variant",
    "reverse_padded",
]
