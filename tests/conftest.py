"""Shared fixtures: a fixed seed for every test, each `zoo.nn` variant, one thread for the `zoo.nn` tests."""

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


@pytest.fixture(autouse=True)
def _one_thread_for_nn_tests(request: pytest.FixtureRequest):
    """The `zoo.nn` tests use tiny tensors: one intra-op thread avoids thread hand-offs on a busy 2-core machine."""
    if not request.node.path.name.startswith("test_nn_"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
