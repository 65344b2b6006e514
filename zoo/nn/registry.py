"""The registry of variants: the names that configs and published checkpoints use. Each cell class registers itself
with the `variant` decorator, so `list_variants` gives them in the order `zoo.nn.cells` defines them."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .cells import RecurrentCell

_FIXED = ("self", "input_size", "hidden_size", "bias")


@dataclass(frozen=True)
class Variant:
    """A registered recurrent variant."""

    name: str
    description: str
    paper: str
    cell: type[RecurrentCell]

    @property
    def options(self) -> dict[str, Any]:
        """The variant's own options (keyword arguments beyond the layer's) with their defaults."""
        params = inspect.signature(self.cell.__init__).parameters
        return {k: p.default for k, p in params.items() if k not in _FIXED}


_REGISTRY: dict[str, Variant] = {}


def register_variant(name: str, description: str, paper: str, cell: type[RecurrentCell]) -> Variant:
    """Add a variant under ``name`` (which must be new) and return it."""
    if name in _REGISTRY:
        raise ValueError(f"variant {name!r} is already registered")
    _REGISTRY[name] = Variant(name, description, paper, cell)
    return _REGISTRY[name]


Cell = TypeVar("Cell", bound="type[RecurrentCell]")


def variant(name: str, description: str, paper: str):
    """Class decorator: register the decorated cell as the variant ``name`` (`register_variant`)."""

    def add(cell: Cell) -> Cell:
        register_variant(name, description, paper, cell)
        return cell

    return add


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError naming the known ones (and the closest) otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown variant {name!r}.{hint} Known variants: {', '.join(_REGISTRY)}") from None


def list_variants() -> list[Variant]:
    """All registered variants, in registration order."""
    return list(_REGISTRY.values())
