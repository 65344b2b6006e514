"""Hostile data inputs: each must raise `DataError` naming the file (or the DataModule) and the problem, before any
training work starts. Files are generated under ``tmp_path``; nothing here reads the shared data except the CLI test."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest

from zoo.cli import main
from zoo.data import (
    CSVForecasting,
    DataError,
    Enwik8,
    HFText,
    PennTreebank,
    SequentialDigits,
    SequentialMNIST,
    TextFile,
    TinyShakespeare,
    UCRArchive,
)

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT.parent / "shared" / "data" / "digits"
CLOSED = "http://127.0.0.1:9"  # a closed port: a download attempt fails at once, never reaching the network

# ------------------------------------------------------------------------------------------- numeric options

MODULES = {
    "digits": (SequentialDigits, {}),
    "mnist": (SequentialMNIST, {}),
    "ucr": (UCRArchive, {}),
    "csv": (CSVForecasting, {"path": "x.csv"}),
    "text": (TextFile, {"path": "x.txt"}),
    "ptb": (PennTreebank, {}),
    "shakespeare": (TinyShakespeare, {}),
    "enwik8": (Enwik8, {}),
    "hf": (HFText, {"path": "text"}),
}
BAD_OPTIONS = [
    ("batch_size", 0),
    ("batch_size", -3),
    ("batch_size", 2.5),
    ("num_workers", -1),
]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_batch_size_or_workers_rejected_at_construction(module: str, option: str, value: object) -> None:
    cls, kwargs = MODULES[module]
    with pytest.raises(DataError, match=rf"{cls.__name__}.*{option} must be an integer >= [01], got {value}"):
        cls(**kwargs, **{option: value})


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (CSVForecasting, {"path": "x.csv", "input_len": 0}),
        (CSVForecasting, {"path": "x.csv", "horizon": -1}),
        (TextFile, {"path": "x.txt", "bptt": 0}),
        (TextFile, {"path": "x.txt", "eval_batch_size": 0}),
    ],
)
def test_bad_window_sizes_rejected_at_construction(cls: type, kwargs: dict) -> None:
    option = next(k for k in kwargs if k != "path")
    with pytest.raises(DataError, match=rf"{option} must be an integer >= 1"):
        cls(**kwargs)


@pytest.mark.skipif(not DIGITS.is_dir(), reason=f"shared data not found at {DIGITS}")
def test_cli_batch_size_zero_fails_before_any_run_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.data_dir", str(DIGITS)]
    # jsonargparse wraps errors of a class's __init__ in a ValueError that quotes them
    with pytest.raises(ValueError, match="SequentialDigits.*batch_size must be an integer >= 1, got 0"):
        main([*args, "--data.batch_size", "0", "--trainer.default_root_dir", str(runs)])
    assert not runs.exists() or not any(runs.rglob("version_*"))


# --------------------------------------------------------------------------------- a directory instead of a file

# Each DataModule on a folder ``d`` and the file it reads first.
FILE_MODULES: dict[str, Callable[[Path], tuple[L.LightningDataModule, Path]]] = {
    "csv": lambda d: (CSVForecasting(str(d / "x.csv")), d / "x.csv"),
    "text": lambda d: (TextFile(str(d / "x.txt")), d / "x.txt"),
    "digits": lambda d: (SequentialDigits(str(d), base_url=CLOSED), d / "optdigits.tes"),
    "mnist": lambda d: (SequentialMNIST(str(d), base_url=CLOSED), d / "train-images-idx3-ubyte.gz"),
    "ucr": lambda d: (UCRArchive(str(d), "Foo", url=None), d / "Foo" / "Foo_TRAIN.ts"),
    "ptb": lambda d: (PennTreebank(str(d), base_url=CLOSED), d / "ptb.char.train.txt"),
    "shakespeare": lambda d: (TinyShakespeare(str(d), base_url=CLOSED), d / "input.txt"),
    "enwik8": lambda d: (Enwik8(str(d), base_url=CLOSED), d / "enwik8"),
}


@pytest.mark.parametrize("module", FILE_MODULES)
def test_a_directory_where_a_file_is_expected(tmp_path: Path, module: str) -> None:
    dm, path = FILE_MODULES[module](tmp_path)
    path.mkdir(parents=True)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: is a directory, expected a file"):
        dm.setup("fit")


@pytest.mark.parametrize("module", FILE_MODULES)
def test_a_file_where_the_data_directory_is_expected(tmp_path: Path, module: str) -> None:
    folder = tmp_path / "data"
    folder.write_text("not a folder\n")
    dm, _ = FILE_MODULES[module](folder / "sub")
    with pytest.raises(DataError, match=f"{re.escape(str(folder))} is a file, expected the directory holding it"):
        dm.setup("fit")
