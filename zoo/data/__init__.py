"""LightningDataModules for the zoo's tasks."""

from .digits import SequentialDigits
from .download import DataError, download, ensure_file, sha256sum, verify
from .forecast import CSVForecasting
from .mnist import SequentialMNIST
from .text import Enwik8, HFText, LanguageModelingData, MahoneyCorpus, PennTreebank, Text8, TextFile, TinyShakespeare
from .ucr import UCRArchive

__all__ = [
    "CSVForecasting",
    "DataError",
    "Enwik8",
    "HFText",
    "LanguageModelingData",
    "MahoneyCorpus",
    "PennTreebank",
    "SequentialDigits",
    "SequentialMNIST",
    "Text8",
    "TextFile",
    "TinyShakespeare",
    "UCRArchive",
    "download",
    "ensure_file",
    "sha256sum",
    "verify",
]
