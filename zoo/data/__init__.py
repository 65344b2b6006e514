"""LightningDataModules for the zoo's tasks; relative data paths are read under the data root (`data_root`:
``$ZOO_DATA``, else ``~/.cache/zoo/data``)."""

from .digits import SequentialDigits
from .download import DataError, download, ensure_file, sha256sum, verify
from .forecast import CSVForecasting
from .mnist import SequentialMNIST
from .root import data_root, resolve_data_path
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
    "data_root",
    "download",
    "ensure_file",
    "resolve_data_path",
    "sha256sum",
    "verify",
]
