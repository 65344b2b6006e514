"""LightningDataModules for the zoo's tasks."""

from .digits import SequentialDigits
from .download import DataError, download, ensure_file, sha256sum, verify
from .forecast import CSVForecasting
from .mnist import SequentialMNIST
from .text import LanguageModelingData, PennTreebank, TextFile, TinyShakespeare
from .ucr import UCRArchive

__all__ = [
    "CSVForecasting",
    "DataError",
    "LanguageModelingData",
    "PennTreebank",
    "SequentialDigits",
    "SequentialMNIST",
    "TextFile",
    "TinyShakespeare",
    "UCRArchive",
    "download",
    "ensure_file",
    "sha256sum",
    "verify",
]
