"""Shared fixtures: the threads of each pytest-xdist worker, a fixed seed for every test, each `zoo.nn` variant, one
thread for the `zoo.nn` tests, and the device of the fused-path tests (``pytest tests/test_nn_fused.py --device
cuda`` checks the fused path against the step-by-step engine on a GPU; the default is the CPU), and the data root of
the tests that read real data sets (``ZOO_DATA``: the project's neighbour ``../shared/data`` where it exists and
``ZOO_DATA`` is unset; see tests/needs_data.py): a test that skips for missing data fails instead under ``CI`` or
``--require-data``. Where Triton is installed and there is no CUDA device, the session sets ``TRITON_INTERPRET=1``
before any Triton kernel is defined, so that the ``triton`` backend's kernels run on CPU tensors under Triton's
interpreter (the tests that compare every backend include it then)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zoo.nn  # noqa: E402
from zoo.data.root import ENV  # noqa: E402

# Under pytest-xdist (pyproject's addopts) each worker takes its share of the CPUs, and so do the processes it starts
# (train.py in a subprocess, DDP ranks): workers x threads stays within the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get(ENV) and SHARED_DATA.is_dir():  # before any test module reads the root
    os.environ[ENV] = str(SHARED_DATA)

MISSING_DATA = "missing data"  # the start of the reason of tests/needs_data.py's skips

VARIANTS = [v.name for v in zoo.nn.list_variants()]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device of the fused-path tests (cpu, cuda, cuda:1, ...)")
    parser.addoption(
        "--require-data",
        action="store_true",
        help="a test that skips for missing data fails instead (the default when the CI variable is set)",
    )


def _require_data(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-data") or os.environ.get("CI"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under ``CI`` (or ``--require-data``), a skip for missing data is a failure, its reason the message."""
    report = yield
    if report.skipped and _require_data(item.config) and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if reason.startswith(MISSING_DATA):
            report.outcome = "failed"
            report.longrepr = f"{reason} (a skip for missing data fails under CI / --require-data)"
    return report


def pytest_configure(config: pytest.Config) -> None:
    try:
        device = torch.device(config.getoption("--device"))
    except RuntimeError as e:
        raise pytest.UsageError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: this torch build or machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {device}: the tests run on cpu or cuda")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The ``--device`` the fused-path tests run on."""
    return torch.device(request.config.getoption("--device"))


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
