"""Loading published models: `read_published` (config and card), `load_pretrained` (the ready model), `evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

import zoo.data
from zoo.models import RecurrentModule

from .format import CARD, CONFIG, WEIGHTS, HubError, ModelCard, build_model, load_weights, read_config
from .sources import MANIFEST, PretrainedInfo, read_manifest, resolve


@dataclass(frozen=True)
class Published:
    """A resolved, verified published model before its weights are read: its directory, config and card."""

    directory: Path
    config: dict[str, Any]
    card: ModelCard

    @property
    def weights(self) -> Path:
        """The safetensors file."""
        return self.directory / WEIGHTS

    @property
    def training_config(self) -> dict[str, Any]:
        """The resolved config that trained the model (as `train.py` saved it), its data paths relative to the data
        root (`zoo.data.root`): the models published before the root existed name ``../shared/data/<sub-path>``."""
        return _root_relative(self.config.get("training_config") or {})


LEGACY_DATA_PREFIX = "../shared/data/"


def _root_relative(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a data ``data_dir`` / ``path`` under `LEGACY_DATA_PREFIX` made relative to the data root."""
    init_args = (config.get("data") or {}).get("init_args") if isinstance(config.get("data"), dict) else None
    if not isinstance(init_args, dict):
        return config
    fixed = {
        k: v.removeprefix(LEGACY_DATA_PREFIX)
        for k, v in init_args.items()
        if k in ("data_dir", "path") and isinstance(v, str) and v.startswith(LEGACY_DATA_PREFIX)
    }
    if not fixed:
        return config
    return {**config, "data": {**config["data"], "init_args": {**init_args, **fixed}}}


def list_pretrained(manifest: str | Path = MANIFEST) -> list[PretrainedInfo]:
    """The published models of the manifest: name, task, variant, dataset, metric and value, size, licence, ..."""
    return list(read_manifest(manifest).values())


def read_published(
    name_or_path: str | Path,
    sha256: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    manifest: str | Path = MANIFEST,
) -> Published:
    """Resolve ``name_or_path`` (a manifest name, directory, http(s) URL or ``hf://owner/repo``), verify its files and
    read its config and card; the weights are not read."""
    directory = resolve(name_or_path, sha256, cache_dir, manifest)
    config = read_config(directory / CONFIG)
    try:
        text = (directory / CARD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HubError(f"{directory / CARD}: unreadable model card: {e}") from e
    return Published(directory, config, ModelCard.from_markdown(text, directory / CARD))


def build_published(published: Published) -> RecurrentModule:
    """The model of ``published`` with its weights, in eval mode on CPU, with ``.card`` and ``.config`` (the training
    config) attached; a language model also gets its vocabulary."""
    model = build_model(published.config, published.directory / CONFIG)
    load_into(model, published)
    model.card = published.card
    model.config = published.training_config
    return model.cpu().eval()


def load_into(model: RecurrentModule, published: Published) -> None:
    """Load the published weights (and a language model's vocabulary) into ``model``, which must have the published
    model's shapes (`HubError` otherwise, and ``model`` is left unchanged): how ``train.py --init_from`` fine-tunes."""
    load_weights(published.weights, model)
    if published.config.get("vocab") is not None:
        model.vocab = list(published.config["vocab"])


def load_pretrained(
    name_or_path: str | Path,
    sha256: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    manifest: str | Path = MANIFEST,
) -> RecurrentModule:
    """A published model, ready to use: eval mode, on CPU, ``model.card`` (a `ModelCard`: metrics, data, training
    time, ...) and ``model.config`` (the resolved training config).

    ``name_or_path``: a name from `list_pretrained`, a directory, an http(s) URL (``sha256`` gives each file's digest
    when the manifest does not) or ``hf://owner/repo[@revision]``. Raises `HubError` and loads nothing if a file is
    missing, fails its sha256, is truncated, or does not fit the config (unknown variant or class, wrong shapes).
    """
    return build_published(read_published(name_or_path, sha256, cache_dir, manifest))


def datamodule_for(model_or_config: RecurrentModule | dict[str, Any], **overrides: Any) -> L.LightningDataModule:
    """The DataModule of a training config (``model.config`` of a loaded model), with ``overrides`` of its init args
    (e.g. ``data_dir``). Only the classes of `zoo.data` are built."""
    config = model_or_config.config if isinstance(model_or_config, RecurrentModule) else model_or_config
    data = config.get("data") or {}
    module, _, name = str(data.get("class_path")).rpartition(".")
    cls = getattr(zoo.data, name, None) if module == "zoo.data" and name in zoo.data.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise HubError(f"the training config's data class {data.get('class_path')!r} is not one of zoo.data's")
    return cls(**{**(data.get("init_args") or {}), **overrides})


def evaluate(
    model: RecurrentModule, datamodule: L.LightningDataModule | None = None, split: str = "test", **data_overrides: Any
) -> dict[str, float]:
    """``split`` ("test" or "validate") metrics of ``model`` on its training config's data (or ``datamodule``), as
    ``train.py test`` computes them: a Lightning ``Trainer`` on CPU, the model in eval mode."""
    datamodule = datamodule or datamodule_for(model, **data_overrides)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    run = trainer.test if split == "test" else trainer.validate
    results = run(model, datamodule=datamodule, verbose=False)
    return {k: float(torch.as_tensor(v)) for k, v in results[0].items()}
