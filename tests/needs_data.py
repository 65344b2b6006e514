"""Tests that read real data sets: where the data root lacks them, they skip with a reason that names what is missing
(``pytest -rs`` prints it, the default here); with ``CI`` set (or ``--require-data``) such a skip fails instead
(tests/conftest.py), so that CI never runs less than it should.

tests/conftest.py points ``ZOO_DATA`` at the project's neighbour ``../shared/data`` when that folder exists and
``ZOO_DATA`` is unset; `DATA` is the data root the tests read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zoo.data.root import ENV, data_root

MISSING_DATA = "missing data"
DATA = data_root()


def _present(path: Path) -> bool:
    """A file, or a folder with something in it (a download that failed may leave an empty one)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _reason(names: tuple[str, ...]) -> str | None:
    absent = [str(DATA / n) for n in names if not _present(DATA / n)]
    if not absent:
        return None
    return (
        f"{MISSING_DATA}: {', '.join(absent)} not found; set {ENV} to a data root that holds it "
        "(docs/data.md: where each data set comes from)"
    )


def needs_data(*names: str) -> pytest.MarkDecorator:
    """Skip (with the reason) unless every ``names`` (paths under the data root) exists."""
    reason = _reason(names)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require_data(*names: str) -> Path:
    """Inside a test or fixture: skip (with the reason) unless every ``names`` exists; the data root otherwise."""
    reason = _reason(names)
    if reason is not None:
        pytest.skip(reason)
    return DATA
