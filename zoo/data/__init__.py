"""LightningDataModules for the zoo's tasks."""

from .download import DataError, download, ensure_file, sha256sum, verify

__all__ = ["DataError", "download", "ensure_file", "sha256sum", "verify"]
