"""The data root: the one folder under which every DataModule finds (or downloads) its files.

``ZOO_DATA`` (an environment variable) names it; unset or empty, it is ``$XDG_CACHE_HOME/zoo/data`` (by default
``~/.cache/zoo/data``), a folder the project creates when it first downloads into it. A DataModule's relative
``data_dir`` / ``path`` (``digits``, ``ett/ETTh1.csv``) is read under the root; an absolute path is used as it is, and
a path that starts with ``./`` or ``../`` is relative to the working directory (a user's own file: ``./sales.csv``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ZOO_DATA"


def data_root() -> Path:
    """The data root: ``$ZOO_DATA``, else ``$XDG_CACHE_HOME/zoo/data`` (``~/.cache/zoo/data``); read at each call."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "zoo" / "data"


def resolve_data_path(path: str | os.PathLike) -> Path:
    """``path`` as the DataModules read it: absolute as given (``~`` expanded), ``./x`` and ``../x`` relative to the
    working directory, any other relative path under `data_root`."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_absolute() or text.startswith(("./", "../", ".\\", "..\\")) or text in (".", ".."):
        return p
    return data_root() / p


def root_hint() -> str:
    """One sentence for error messages: where relative data paths are read and how to change it."""
    return (
        f"The data root is {data_root()} (set it with the {ENV} environment variable; a relative data path is read "
        "under it, ./path is read from the working directory)."
    )
