"""Shared fixtures: a fixed seed for every test and the list of `zoo.nn` variants."""

from __future__ import annotations

import pytest
import torch

import zoo.nn

VARIANTS = [v.name for v in zoo.nn.list_variants()]


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    """Each registered variant by name (a test narrows it with ``@pytest.mark.parametrize("variant", ...)``)."""
    return request.param
