"""LightningDataModules for the zoo's tasks."""

from .digits import SequentialDigits
from .download import DataError, download, ensure_file, sha256sum, verify
from .mnist import SequentialMNIST
from .text import LanguageModelingData, PennTreebank, TextFile, TinyShakespeare

__all__ = [
    "DataError",
    "LanguageModelingData",
    "PennTreebank",
    "SequentialDigits",
    "SequentialMNIST",
    "TextFile",
    "TinyShakespeare",
    "download",
    "ensure_file",
    "sha256sum",
    "verify",
]
