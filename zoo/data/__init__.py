"""LightningDataModules for the zoo's tasks."""

from .digits import SequentialDigits
from .download import DataError, download, ensure_file, sha256sum, verify

__all__ = ["DataError", "SequentialDigits", "download", "ensure_file", "sha256sum", "verify"]
