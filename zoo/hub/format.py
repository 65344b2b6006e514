"""The published format of a zoo model: a directory holding three files.

- ``model.safetensors``: the weights and buffers (``state_dict``) as safetensors (no pickle anywhere);
- ``config.json``: the format tag, the zoo version, the variant, the model class and its init args (``dims``
  included, so the model is rebuilt with no data present), a language model's vocabulary, and the resolved training
  config that produced it;
- ``README.md``: the model card; its YAML front matter (the ``zoo:`` key) holds the card's fields, the body the same in
  prose.

Reading a directory checks everything before a weight is loaded: the config's format, model class (only the classes
of `zoo.models`) and variant, and every tensor's name, shape and dtype against the model the config builds.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import zoo.models
import zoo.nn
from zoo.data import DataError
from zoo.models import RecurrentModule

FORMAT = "zoo.hub/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FILES = (WEIGHTS, CONFIG, CARD)
TASKS = {
    "SequenceClassifier": "sequence classification",
    "LanguageModel": "language modelling",
    "Forecaster": "forecasting",
}


class HubError(DataError):
    """A published model that cannot be used: missing, corrupt or inconsistent files. Nothing was loaded."""


@dataclass(frozen=True)
class ModelCard:
    """The model card's fields (the ``zoo:`` front matter of ``README.md``); ``text`` is the whole file."""

    name: str
    task: str
    variant: str
    dataset: str
    split: str
    licence: str
    metric: str
    metrics: dict[str, float]
    measured: str
    training: str
    training_time_s: float | None
    hardware: str
    command: str
    evaluate: str
    paper: str
    parameters: int
    convergence: str = ""  # how the validation curve ended (`zoo.hub.publish.convergence`); "" on older cards
    text: str = field(default="", repr=False, compare=False)

    @property
    def value(self) -> float:
        """The headline metric's value."""
        return self.metrics[self.metric]

    def to_markdown(self) -> str:
        """``README.md``: front matter (Hugging Face's keys, and ``zoo:`` with every field), then the card in prose."""
        data = {k: v for k, v in asdict(self).items() if k != "text"}
        front = {
            "library_name": "zoo",
            "license": "mit",
            "tags": ["zoo", "recurrent", self.variant, self.task.replace(" ", "-")],
            "zoo": data,
        }
        minutes = f"{self.training_time_s / 60:.1f} min" if self.training_time_s is not None else "not recorded"
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.metrics.items()))
        rows = [
            ("task", self.task),
            ("variant", f"`{self.variant}` ({self.paper})"),
            ("data", f"{self.dataset}; licence: {self.licence}"),
            ("split", self.split),
            ("metric", f"**{self.metric} = {self.value:.4f}**"),
            ("how it was measured", self.measured),
            ("all metrics", metrics),
            ("parameters", f"{self.parameters:,}"),
            ("training", self.training),
            *([("convergence", self.convergence)] if self.convergence else []),
            ("training time", f"{minutes} on {self.hardware}"),
            ("reproduce", f"`{self.command}`"),
            ("evaluate", f"`{self.evaluate}`"),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return (
            f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {self.name}\n\nA `{self.variant}` model of the `zoo` model zoo: {self.task} on {self.dataset}.\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            "## Use\n\n"
            f'```python\nimport zoo.hub\n\nmodel = zoo.hub.load_pretrained("{self.name}")  # eval mode, on CPU\n'
            "print(model.card.metrics)\n```\n\n"
            "Files: `model.safetensors` (weights), `config.json` (the model class, its init args, the zoo version and "
            "the resolved training config), `README.md` (this card).\n"
        )

    @classmethod
    def from_markdown(cls, text: str, source: str | Path = CARD) -> ModelCard:
        """Parse a card written by `to_markdown` (its front matter); `HubError` naming ``source`` if it is not one."""
        parts = text.split("---\n", 2)
        try:
            if len(parts) < 3 or parts[0].strip():
                raise ValueError("no YAML front matter")
            data = yaml.safe_load(parts[1])["zoo"]
            names = {f.name for f in fields(cls)} - {"text"}
            optional = {f.name for f in fields(cls) if f.default is not MISSING}  # fields later cards added
            missing = sorted(names - set(data) - optional)
            if missing:
                raise ValueError(f"missing fields {missing}")
            return cls(**{k: data[k] for k in names if k in data}, text=text)
        except (ValueError, TypeError, KeyError, yaml.YAMLError) as e:
            raise HubError(f"{source}: not a zoo model card: {e}") from e


def model_class(class_path: str) -> type[RecurrentModule]:
    """The model class named by ``class_path``, which must be one of `zoo.models`' (nothing else is imported)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(zoo.models, name, None) if module == "zoo.models" and name in zoo.models.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, RecurrentModule) and cls is not RecurrentModule):
        known = ", ".join(f"zoo.models.{n}" for n in TASKS)
        raise HubError(f"unknown model class {class_path!r}; a published model is one of {known}")
    return cls


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``config.json``: the format, the model class and the variant (`HubError` if any is wrong)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: unreadable or truncated config: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else None
        raise HubError(f"{path}: not a zoo model config (format {got!r}, expected {FORMAT!r})")
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("init_args"), dict):
        raise HubError(f"{path}: 'model' must hold 'class_path' and 'init_args'")
    model_class(str(model.get("class_path")))
    variant = model["init_args"].get("variant")
    known = [v.name for v in zoo.nn.list_variants()]
    if variant not in known:
        raise HubError(f"{path}: unknown variant {variant!r} (known: {', '.join(known)})")
    if config.get("variant", variant) != variant:
        raise HubError(f"{path}: 'variant' {config['variant']!r} differs from the model's {variant!r}")
    return config


def build_model(config: dict[str, Any], source: str | Path = CONFIG) -> RecurrentModule:
    """The untrained model that ``config`` (checked by `read_config`) describes."""
    model = config["model"]
    try:
        return model_class(model["class_path"])(**model["init_args"])
    except (TypeError, ValueError) as e:
        raise HubError(f"{source}: cannot build {model['class_path']} from its init_args: {e}") from e


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Write ``module.state_dict()`` to ``path`` as safetensors (each tensor copied, so none share memory)."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "zoo.hub": FORMAT})


def check_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Check that the safetensors file holds exactly ``module``'s tensors with their shapes and dtypes.

    Only the file's header is read. `HubError` lists every missing, unexpected or mismatched tensor.
    """
    expected = module.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise HubError(f"{path}: not a complete safetensors file (truncated or corrupt): {e}") from e
    dtypes = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}
    dtypes.update({torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"})
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    for k, t in expected.items():
        want = (tuple(t.shape), dtypes.get(t.dtype, str(t.dtype)))
        if k in found and found[k] != want:
            problems.append(f"{k}: file has {found[k][1]} {list(found[k][0])}, the model {want[1]} {list(want[0])}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise HubError(f"{path}: the weights do not fit the model its config builds: {shown}")


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load the safetensors file into ``module`` after `check_weights`; on any error ``module`` is left unchanged."""
    check_weights(path, module)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise HubError(f"{path}: not a complete safetensors file (truncated or corrupt): {e}") from e
    module.load_state_dict(tensors, strict=True)
