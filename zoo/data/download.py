"""Find a data file locally, or download it once from its canonical source, verify its sha256 and cache it."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .root import root_hint


class DataError(ValueError):
    """Missing, corrupt or malformed data; the message names the file (and line or column) at fault."""


def sha256sum(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | os.PathLike, sha256: str | None) -> None:
    """Raise `DataError` if ``path``'s sha256 is not ``sha256`` (``None`` skips the check)."""
    if sha256 is None:
        return
    got = sha256sum(path)
    if got != sha256:
        raise DataError(
            f"{path}: sha256 {got} does not match the expected {sha256}; the file is truncated or corrupt. "
            "Delete it to download it again."
        )


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` through a ``.part`` file, verify it, and only then move it into place.

    The ``.part`` file's name is unique to the call (``<name>.<random>.part``), so processes downloading the same file
    at once (several nodes on one shared file system) never write into each other's file; the last move wins.

    ``check``, if given, is called on the downloaded file after the sha256 check and raises `DataError` to reject it
    (e.g. a hash of the decompressed content); a rejected download leaves no file behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{dest.name}.", suffix=".part", dir=dest.parent)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        verify(part, sha256)
        if check is not None:
            check(part)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        expected = f" (sha256 {sha256})" if sha256 else ""
        raise DataError(
            f"{dest} does not exist and could not be downloaded from {url}: {e}. "
            f"Offline, put a copy of that file{expected} at {dest}. {root_hint()}"
        ) from e
    except DataError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def check_file_path(path: str | os.PathLike) -> None:
    """Raise `DataError` if ``path`` is a directory, or if the nearest existing folder above it is not a directory."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DataError(f"{path}: {parent} is a file, expected the directory holding it")


def ensure_file(
    path: str | os.PathLike,
    url: str | None = None,
    sha256: str | None = None,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Return ``path``, downloading it from ``url`` first if it is absent; verify it (sha256, ``check``) either way.

    A directory at ``path`` (or a file where a folder above it should be) is a `DataError`, not an absent file.
    """
    path = Path(path)
    check_file_path(path)
    if path.is_file():
        verify(path, sha256)
        if check is not None:
            check(path)
        return path
    if url is None:
        raise DataError(f"{path} does not exist and there is no source to download it from. {root_hint()}")
    return download(url, path, sha256, check=check)
