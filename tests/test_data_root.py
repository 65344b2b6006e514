"""The data root (`zoo.data.root`): ZOO_DATA or the user cache, how relative paths resolve, what a missing file says,
and that a test skipping for missing data fails under CI (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs_data import require_data

from zoo.data import CSVForecasting, DataError, SequentialDigits, data_root, resolve_data_path

ROOT = Path(__file__).resolve().parents[1]


def test_zoo_data_sets_the_root_else_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("ZOO_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "zoo" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == Path.home() / ".cache" / "zoo" / "data"


def test_relative_paths_resolve_under_the_root_absolute_and_dot_paths_do_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    assert resolve_data_path("ett/ETTh1.csv") == tmp_path / "ett" / "ETTh1.csv"
    assert resolve_data_path("/abs/x.csv") == Path("/abs/x.csv")
    assert resolve_data_path("./x.csv") == Path("x.csv")
    assert resolve_data_path("../x.csv") == Path("../x.csv")
    assert SequentialDigits().data_dir == tmp_path / "digits"
    assert CSVForecasting("mine/sales.csv").path == tmp_path / "mine" / "sales.csv"


def test_a_missing_file_says_where_it_looked_and_how_to_set_the_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        CSVForecasting("mine/sales.csv").prepare_data()
    msg = str(e.value)
    assert str(tmp_path / "mine" / "sales.csv") in msg and "no source to download it from" in msg
    assert "ZOO_DATA" in msg and str(tmp_path) in msg
    dm = SequentialDigits(base_url="http://127.0.0.1:9")  # nothing listens there: the download fails at once
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "could not be downloaded from http://127.0.0.1:9/optdigits.tes" in msg and "ZOO_DATA" in msg


@pytest.mark.skipif(not os.environ.get("ZOO_SELFTEST_MISSING"), reason="run by the test below in a subprocess")
def test_needs_missing_data() -> None:
    require_data("no-such-data-set")


@pytest.mark.parametrize("ci", [False, True])
def test_a_skip_for_missing_data_fails_under_ci(ci: bool, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"ZOO_SELFTEST_MISSING": "1", "ZOO_DATA": str(tmp_path)}
    if ci:
        env["CI"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"{__file__}::test_needs_missing_data"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert f"missing data: {tmp_path / 'no-such-data-set'} not found" in done.stdout
    assert (done.returncode != 0) == ci, done.stdout[-2000:]
