"""LightningModules for the zoo's tasks; every one takes ``variant`` and the `zoo.nn.RNN` options."""

from .base import RecurrentModule, build_rnn, require_dims, rnn_kwargs
from .classifier import SequenceClassifier
from .forecaster import Forecaster
from .language_model import LanguageModel

__all__ = [
    "Forecaster",
    "LanguageModel",
    "RecurrentModule",
    "SequenceClassifier",
    "build_rnn",
    "require_dims",
    "rnn_kwargs",
]
