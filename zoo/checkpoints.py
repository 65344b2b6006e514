"""Reading Lightning checkpoints safely: weights only, whatever the source, with errors that name the file.

A ``.ckpt`` file is a pickle, and unpickling a full pickle runs whatever code it names. Every checkpoint the zoo reads
(``--ckpt_path`` of fit, validate, test and predict, resuming with ``--ckpt_path last``,
`RecurrentModule.load_from_checkpoint`, ``python -m zoo.hub export``) is read with ``torch.load(...,
weights_only=True)``: tensors, plain containers, numbers and strings, nothing that executes. That holds for remote
checkpoints too (http(s) URLs, which Lightning itself would read as full pickles). `load_checkpoint` reads a file
up front so that a missing, truncated, corrupt or code-carrying checkpoint stops the command before any work starts.
"""

from __future__ import annotations

import os
import pickle
import re
import urllib.error
from pathlib import Path
from typing import IO, Any

import fsspec
import torch

from zoo.data import DataError

KEYWORDS = ("last", "best", "hpc", "registry")  # Lightning's own ckpt_path values, resolved by the Trainer
REFUSED = (
    "a full pickle can run code when it is loaded, so the zoo loads only tensors and plain types (see SECURITY.md)"
)


class CheckpointError(DataError):
    """A checkpoint that cannot be read safely: missing, truncated, corrupt, or carrying code. Nothing was loaded."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote file (``scheme://...``) rather than a local one."""
    return "://" in str(path) and not str(path).startswith("file://")


def load_checkpoint(path: str | os.PathLike | IO[bytes], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning checkpoint from a local path, a URL or an open binary file, weights only.

    A local file is memory-mapped, so checking a large checkpoint costs little; an http(s) URL is downloaded once into
    torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), which the Trainer's own read then finds. `CheckpointError`
    names the file and the problem.
    """
    name = getattr(path, "name", None) or str(path)
    try:
        if hasattr(path, "read"):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        elif str(path).startswith(("http://", "https://")):
            checkpoint = torch.hub.load_state_dict_from_url(
                str(path), map_location=map_location, weights_only=True, progress=False
            )
        elif is_url(path):
            with fsspec.open(str(path), "rb") as f:
                checkpoint = torch.load(f, map_location=map_location, weights_only=True)
        else:
            local = Path(path)
            if local.is_dir():
                raise CheckpointError(f"{local}: is a directory, not a checkpoint file")
            if not local.is_file():
                raise CheckpointError(f"{local}: no such checkpoint file")
            if local.stat().st_size == 0:
                raise CheckpointError(f"{local}: empty file, not a checkpoint")
            checkpoint = torch.load(local, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it names {found.group(1)}, which is not a tensor or a plain type)" if found else ""
        raise CheckpointError(f"{name}: refused: not a weights-only checkpoint{what}; {REFUSED}") from e
    except urllib.error.URLError as e:
        raise CheckpointError(f"{name}: could not download the checkpoint: {e}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{name}: not a complete checkpoint (truncated or corrupt): {e}") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{name}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_ckpt_path(ckpt_path: str | None, last: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Read the checkpoint that a command's ``--ckpt_path`` names (`load_checkpoint`), before any work starts, and
    return it (None where nothing was read).

    Lightning's keywords are resolved by the Trainer; of them, ``last`` is checked here when ``last`` (the run's
    ``last.ckpt``) exists, since resuming reads it.
    """
    if ckpt_path is None:
        return None
    if ckpt_path in KEYWORDS:
        if ckpt_path == "last" and last is not None and Path(last).is_file():
            return load_checkpoint(last)
        return None
    return load_checkpoint(ckpt_path)
