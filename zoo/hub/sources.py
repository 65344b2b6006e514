"""Where published models come from: the manifest, and resolving a name, directory, URL or Hugging Face repo to a local
directory whose files have been verified.

A source is one of:
- a name in ``zoo/hub/manifest.json`` (its ``source`` is one of the following; a relative path is relative to
  ``zoo/hub``, which is how the bundled models are found);
- a local directory;
- an ``http(s)://`` URL of a directory: each file is downloaded once into the cache (``$ZOO_HUB_CACHE``, default
  ``~/.cache/zoo/hub``) through a ``.part`` file that is sha256-verified before it is moved into place, so nothing
  unverified is ever read. The sha256 of every file comes from the manifest or the caller (``sha256=``);
- ``hf://<owner>/<repo>[@<revision>]``, a Hugging Face Hub model repository, read with ``huggingface_hub`` (its
  cache; ``HF_HUB_OFFLINE=1`` reads only the cache). Files are checked against the manifest's sha256 when known.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.data import DataError, download, sha256sum, verify

from .format import FILES, HubError

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class PretrainedInfo:
    """A manifest entry: what `list_pretrained` shows, plus where the files are and their sha256."""

    name: str
    task: str
    variant: str
    dataset: str
    metric: str
    value: float
    size: int
    parameters: int
    licence: str
    source: str = field(repr=False)
    files: dict[str, str] = field(repr=False)
    metrics: dict[str, float] = field(repr=False)
    training_time_s: float | None = field(default=None, repr=False)


def read_manifest(path: str | Path = MANIFEST) -> dict[str, PretrainedInfo]:
    """The manifest's entries by name (an absent manifest is empty)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: PretrainedInfo(name=name, **entry) for name, entry in data["models"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise HubError(f"{path}: not a valid manifest: {e}") from e


def write_manifest(entries: dict[str, PretrainedInfo], path: str | Path = MANIFEST) -> None:
    """Write the manifest, entries sorted by name."""
    models = {}
    for name in sorted(entries):
        entry = dict(vars(entries[name]))
        del entry["name"]
        models[name] = entry
    Path(path).write_text(json.dumps({"models": models}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$ZOO_HUB_CACHE``, else ``~/.cache/zoo/hub``."""
    return Path(cache_dir or os.environ.get("ZOO_HUB_CACHE") or Path.home() / ".cache" / "zoo" / "hub")


def resolve(
    name_or_path: str | Path,
    sha256: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    manifest: str | Path = MANIFEST,
) -> Path:
    """A local directory holding the published files of ``name_or_path``, each verified against its sha256 when one
    is known (from the manifest or ``sha256``, a dict file name -> hex digest)."""
    text = str(name_or_path)
    entries = read_manifest(manifest)
    if text in entries:
        entry = entries[text]
        source = entry.source
        if not (source.startswith(("http://", "https://", HF_PREFIX)) or Path(source).is_absolute()):
            source = str(Path(manifest).resolve().parent / source)
        return _resolve_source(source, {**entry.files, **(sha256 or {})}, cache_dir)
    if text.startswith(("http://", "https://", HF_PREFIX)) or Path(text).is_dir():
        return _resolve_source(text, sha256 or {}, cache_dir)
    known = ", ".join(sorted(entries)) or "none"
    raise HubError(
        f"{text!r} is neither a published model (known: {known}) nor a directory, an http(s) URL or hf://<owner>/<repo>"
    )


def _resolve_source(source: str, sha256: dict[str, str], cache_dir: str | Path | None) -> Path:
    if source.startswith(("http://", "https://")):
        return _from_url(source, sha256, cache_dir)
    if source.startswith(HF_PREFIX):
        return _from_hf(source[len(HF_PREFIX) :], sha256, cache_dir)
    directory = Path(source)
    for file in FILES:
        path = directory / file
        if not path.is_file():
            raise HubError(f"{directory}: no {file}; a published model directory holds {', '.join(FILES)}")
        _verify(path, sha256.get(file))
    return directory


def _verify(path: Path, sha256: str | None) -> None:
    try:
        verify(path, sha256)
    except DataError as e:
        raise HubError(str(e)) from e


def _from_url(url: str, sha256: dict[str, str], cache_dir: str | Path | None) -> Path:
    missing = [f for f in FILES if f not in sha256]
    if missing:
        raise HubError(
            f"{url}: no sha256 for {', '.join(missing)}; a URL is read only with the sha256 of each file (from the "
            "manifest, or sha256={file: digest})"
        )
    base = url.rstrip("/")
    directory = cache_root(cache_dir) / "url" / hashlib.sha256(base.encode()).hexdigest()[:16]
    for file in FILES:
        path = directory / file
        if path.is_file() and sha256sum(path) != sha256[file]:
            path.unlink()  # a stale or damaged cache entry: fetch it again
        if not path.is_file():
            try:
                download(f"{base}/{file}", path, sha256[file], progress=False)
            except DataError as e:
                raise HubError(str(e)) from e
    return directory


def _from_hf(repo: str, sha256: dict[str, str], cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    kwargs: dict[str, Any] = {"revision": revision or None}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir) / "hf")
    paths = []
    for file in FILES:
        try:
            paths.append(Path(hf_hub_download(repo_id, file, **kwargs)))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            raise HubError(
                f"{HF_PREFIX}{repo}: cannot get {file} from the Hugging Face Hub or its cache "
                f"(HF_HUB_OFFLINE={constants.HF_HUB_OFFLINE}): {e}"
            ) from e
        _verify(paths[-1], sha256.get(file))
    if len({p.parent for p in paths}) != 1:
        raise HubError(f"{HF_PREFIX}{repo}: the files come from different revisions; pass @<revision>")
    return paths[0].parent
