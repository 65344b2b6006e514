"""Hostile data inputs: each must raise `DataError` naming the file (or the DataModule) and the problem, before any
training work starts. Files are generated under ``tmp_path``; only the digits CLI test reads the shared data, and no
test reaches the network (downloads go to a closed local port)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from needs_data import DATA, needs_data

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
DIGITS = DATA / "digits"
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


@needs_data("digits")
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


# ------------------------------------------------------------------------------------------------ forecasting CSVs

CSV_COLUMNS = ["date", "HULL", "MULL", "OT"]


def write_csv(path: Path, rows: int = 96, header: list[str] = CSV_COLUMNS, cells: dict | None = None) -> Path:
    """An hourly CSV of ``rows`` rows (4 days by default); ``cells[(row, column)]`` replaces a cell's text."""
    lines = [",".join(header)]
    for i in range(rows):
        texts = [
            f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00",
            *(f"{(i * k) % 7 + k}.5" for k in range(1, len(header))),
        ]
        for (r, c), text in (cells or {}).items():
            if r == i:
                texts[header.index(c)] = text
        lines.append(",".join(texts))
    path.write_text("\n".join(lines) + "\n")
    return path


def forecasting(path: Path, **kwargs: object) -> CSVForecasting:
    return CSVForecasting(str(path), **({"input_len": 8, "horizon": 4, "split": ("2D", "1D", "1D")} | kwargs))


def test_the_clean_csv_loads(tmp_path: Path) -> None:
    dm = forecasting(write_csv(tmp_path / "ok.csv"))
    dm.setup("fit")
    assert dm.dims == {"input_size": 3, "output_size": 1, "horizon": 4, "max_steps": 8}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["date", "OT", "HULL", "OT"], "line 1: the header names column\\(s\\) 'OT' more than once"),
        (["date", "HULL", "OT", "HULL"], "line 1: the header names column\\(s\\) 'HULL' more than once"),
        (["date", "HULL", "OT", " HULL "], "line 1: the header names column\\(s\\) 'HULL' more than once"),
        (["date", "date", "HULL", "OT"], "line 1: the header names column\\(s\\) 'date' more than once"),
        (["date", "HULL", "", "OT"], "line 1: column 3 of the header has no name"),
    ],
)
def test_csv_header_with_a_repeated_or_empty_name(tmp_path: Path, header: list[str], message: str) -> None:
    path = write_csv(tmp_path / "dup.csv", header=header)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}, {message}"):
        forecasting(path).setup("fit")


@pytest.mark.parametrize("option", [{"target": ["OT", "OT"]}, {"features": ["HULL", "OT", "HULL"]}])
def test_csv_option_naming_a_column_twice(tmp_path: Path, option: dict) -> None:
    with pytest.raises(DataError, match=f"{next(iter(option))} names '.*' more than once"):
        forecasting(tmp_path / "x.csv", **option)


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "+INF", "1e999", "-1e400"])
@pytest.mark.parametrize("missing", ["reject", "ffill", "interpolate"])
def test_csv_infinite_cell(tmp_path: Path, text: str, missing: str) -> None:
    path = write_csv(tmp_path / "inf.csv", cells={(30, "OT"): text})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 32, column 'OT': .* is not a finite number"):
        forecasting(path, missing=missing).setup("fit")


@pytest.mark.parametrize("text", ["", "NaN", "nan", "-nan", "NA", "null"])
def test_csv_missing_cell_rejected_by_default(tmp_path: Path, text: str) -> None:
    path = write_csv(tmp_path / "nan.csv", cells={(5, "HULL"): text})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 7, column 'HULL': missing value"):
        forecasting(path).setup("fit")


def test_cli_fit_on_a_csv_with_inf_fails_before_any_run_folder(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "inf.csv", cells={(30, "OT"): "inf"})
    runs = tmp_path / "runs"
    args = ["--data.path", str(path), "--data.split", "[2D, 1D, 1D]", "--data.input_len", "8", "--data.horizon", "4"]
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 32, column 'OT': 'inf' is not a finite"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "ett" / "lstm.yaml"),
                *args,
                "--trainer.default_root_dir",
                str(runs),
            ]
        )
    assert not runs.exists() or not any(runs.rglob("version_*"))


def test_csv_column_with_every_value_missing(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "nan.csv", cells={(i, "MULL"): "nan" for i in range(96)})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, column 'MULL': every value is missing"):
        forecasting(path, missing="ffill").setup("fit")


@pytest.mark.parametrize("text", ["abc", "1.2.3", "0x10", "1_000", "\u0661\u0662", "12 kV", "True", '"3,5"'])
def test_csv_non_numeric_cell(tmp_path: Path, text: str) -> None:
    path = write_csv(tmp_path / "type.csv", cells={(40, "HULL"): text})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 42, column 'HULL': .* is not a number"):
        forecasting(path).setup("fit")


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (0, {}, "no data rows after the header"),
        (1, {}, "a split in months or days needs a date column with two rows or more"),
        (60, {}, r"the split \('2D', '1D', '1D'\) needs 96 rows, the file has 60"),
        (96, {"split": (90, 3, 3)}, "the val part .* holds no window"),
        (15, {"split": (0.6, 0.2, 0.2)}, "the train part .* holds no window"),
        (96, {"input_len": 60}, "the train part .* holds no window"),
        (96, {"split": (48, 24, 24), "horizon": 30}, "the val part .* holds no window"),
    ],
)
def test_csv_too_few_rows(tmp_path: Path, rows: int, kwargs: dict, message: str) -> None:
    path = write_csv(tmp_path / "short.csv", rows=rows)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*{message}"):
        forecasting(path, **kwargs).setup("fit")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file, expected a header row"),
        (b"date,HULL,MULL,OT\n2020-01-01 00:00:00,1,2\n", "line 2: 3 field\\(s\\), the header has 4"),
        (b"date,HULL,MULL,OT\n\xff\xfe\x00\x01garbage\n", "not a UTF-8 text file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 text file"),
    ],
)
def test_csv_empty_truncated_or_binary(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*{message}"):
        forecasting(path).setup("fit")


# ------------------------------------------------------------------------------------------------------ text files

BAD_TEXT = {
    "empty": (b"", ": empty file \\(0 bytes\\)"),
    "nul": (b"line one\nline two\x00\x00\x00binary\n", ", line 2: a NUL byte; a binary file"),
    "latin1": ("caf\u00e9\nna\u00efve\n".encode("latin-1"), ", line 1: not valid UTF-8"),
    "utf16": ("hello\nworld\n".encode("utf-16"), ", line 1: not valid UTF-8"),
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", ", line 1: not valid UTF-8"),
    "elf": (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00", ", line 1: a NUL byte; a binary file"),
}


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("kind", BAD_TEXT)
def test_text_file_empty_or_binary(tmp_path: Path, kind: str, level: str) -> None:
    content, message = BAD_TEXT[kind]
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}{message}"):
        TextFile(str(path), level=level, batch_size=1, bptt=2).setup("fit")


@pytest.mark.parametrize("content", ["\n\n\n", "   \n \t \n"])
def test_text_file_of_whitespace_only(tmp_path: Path, content: str) -> None:
    path = tmp_path / "blank.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: the (train|valid|test) split is empty"):
        TextFile(str(path), level="word", batch_size=1, bptt=2).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 64}, "the train split is too small: a stream of 90 symbols is too short for 64 rows"),
        ({"eval_batch_size": 4}, "the valid split is too small: a stream of 5 symbols is too short for 4 rows"),
    ],
)
def test_text_split_too_small_for_its_rows_fails_in_setup(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = tmp_path / "small.txt"
    path.write_text("abcdefghij" * 10)  # 90 / 5 / 5 characters
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: {message}"):
        TextFile(str(path), **({"batch_size": 2} | kwargs)).setup("fit")


def test_hf_text_with_an_empty_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = {split: tmp_path / f"{split}.txt" for split in ("train", "validation", "test")}
    for split, path in files.items():
        path.write_text("\n" if split == "validation" else "some text\n")  # valid: one empty row
    dm = HFText("text", data_files={k: str(v) for k, v in files.items()}, batch_size=1, bptt=2)
    with pytest.raises(DataError, match="hf:text: the valid split is empty"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------- UCR/UEA .ts files

HEAD = {
    "problemName": "P",
    "timeStamps": "false",
    "missing": "false",
    "univariate": "true",
    "equalLength": "true",
    "seriesLength": "3",
    "classLabel": "true a b",
}  # 7 header lines, @data on line 8, the first case on line 9
GOOD_CASES = ["1,2,3:a", "4,5,6:b", "1,2,4:a", "4,5,7:b"]


def ts_text(cases: list[str] = GOOD_CASES, after: str = "", **header: str | None) -> str:
    """A .ts file: ``HEAD`` updated by ``header`` (None drops a line), ``after`` (lines) after it, @data, ``cases``."""
    head = [f"@{k} {v}" for k, v in (HEAD | header).items() if v is not None]
    return "\n".join([*head, *after.splitlines(), "@data", *cases]) + "\n"


BAD_TS = {
    "empty file": ("", ": empty file"),
    "blank file": ("\n  \n\n", ": empty file"),
    "binary file": ("@problemName P\n\udcff\udcfe\x00", ": not a text file"),
    "header only, no @data": ("@problemName P\n@classLabel true a b\n", ", line 2: no @data line by the end"),
    "cases without @data": (ts_text().replace("@data\n", ""), ", line 8: expected a header line"),
    "no @classLabel": (ts_text(classLabel=None), ", line 7: @data before @classLabel"),
    "@classLabel false": (ts_text(classLabel="false"), ", line 7: @classLabel false: not a classification"),
    "@classLabel without labels": (ts_text(classLabel="true"), ", line 7: @classLabel must list distinct labels"),
    "repeated class labels": (ts_text(classLabel="true a b a"), ", line 7: @classLabel must list distinct labels"),
    "@timeStamps true": (ts_text(timeStamps="true"), ", line 2: @timeStamps true is not supported"),
    "bad @seriesLength": (ts_text(seriesLength="three"), ", line 6: @seriesLength must be a positive integer"),
    "@dimensions 0": (ts_text(after="@dimensions 0"), ", line 8: @dimensions must be a positive integer"),
    "@univariate true with 2 dimensions": (ts_text(after="@dimensions 2"), ", line 9: @univariate true, but @dim"),
    "bad @univariate": (ts_text(univariate="maybe"), ", line 8: @univariate must be true or false"),
    "class label not in the header": (ts_text(["1,2,3:a", "4,5,6:c"]), ", line 10: class label 'c' is not one of"),
    "numeric label for named classes": (ts_text(["1,2,3:a", "4,5,6:1"]), ", line 10: class label '1' is not one of"),
    "unequal length, @seriesLength": (ts_text(["1,2,3:a", "4,5:b"]), ", line 10: length 2, but the header has @ser"),
    "unequal length, no @seriesLength": (
        ts_text(["1,2,3:a", "4,5,6:b", "1,2,3,4:a"], seriesLength=None),
        ", line 10: length 4, but @equalLength true and the first case \\(line 8\\) has length 3",
    ),
    "two channels in a univariate file": (ts_text(["1,2,3:a", "1,2,3:4,5,6:b"]), ", line 10: 2 channel\\(s\\)"),
    "fewer channels than @dimensions": (
        ts_text(["1,2,3:4,5,6:a", "1,2,3:b"], univariate="false", after="@dimensions 2"),
        ", line 11: 1 channel\\(s\\), but the header / first case has 2",
    ),
    "channels of different lengths": (
        ts_text(["1,2,3:4,5:a"], univariate="false", equalLength=None, seriesLength=None),
        ", line 7: the channels have different lengths",
    ),
    "non-numeric value": (ts_text(["1,2,3:a", "4,x,6:b"]), ", line 10: channel 1, value 2: 'x' is not a number"),
    "empty value": (ts_text(["1,,3:a"]), ", line 9: channel 1, value 2: '' is not a number"),
    "NUL in a value": (ts_text(["1,2\x00,3:a"]), ", line 9: channel 1, value 2: .* is not a number"),
    "inf value": (ts_text(["1,inf,3:a"]), ", line 9: channel 1, value 2: 'inf' is not a finite number"),
    "overflowing value": (ts_text(["1,2,-1e999:a"]), ", line 9: channel 1, value 3: '-1e999' is not a finite"),
    "truncated line, no label": (ts_text(["1,2,3:a", "4,5,6"]), ", line 10: malformed case"),
    "truncated line, empty label": (ts_text(["1,2,3:a", "4,5,6:"]), ", line 10: class label '' is not one of"),
    "truncated line, cut in a value": (ts_text(["1,2,3:a", "4,5,"]), ", line 10: malformed case"),
    "no cases": (ts_text([]), ", line 8: no cases after @data"),
    "header line after @data": (ts_text(["1,2,3:a", "@data", "4,5,6:b"]), ", line 10: header line '@data' after"),
}


def write_ucr(folder: Path, train: str, test: str) -> UCRArchive:
    """Data set ``P`` in ``folder`` with the given TRAIN and TEST texts."""
    (folder / "P").mkdir(parents=True)
    for split, text in (("TRAIN", train), ("TEST", test)):
        (folder / "P" / f"P_{split}.ts").write_text(text, encoding="utf-8", errors="surrogateescape")
    return UCRArchive(str(folder), "P", url=None, val_fraction=0.5)


def test_the_clean_ts_files_load_with_or_without_a_bom(tmp_path: Path) -> None:
    dm = write_ucr(tmp_path, "\ufeff" + ts_text(), ts_text())
    dm.setup("fit")
    assert dm.dims == {"input_size": 1, "num_classes": 2, "max_steps": 3}


@pytest.mark.parametrize("split", ["TRAIN", "TEST"])
@pytest.mark.parametrize("kind", BAD_TS)
def test_malformed_ts_file(tmp_path: Path, kind: str, split: str) -> None:
    text, message = BAD_TS[kind]
    dm = write_ucr(tmp_path, *((text, ts_text()) if split == "TRAIN" else (ts_text(), text)))
    with pytest.raises(DataError, match=re.escape(str(dm.split_path(split))) + message):
        dm.setup("fit")


def test_ts_class_in_test_without_a_training_case(tmp_path: Path) -> None:
    dm = write_ucr(tmp_path, ts_text(["1,2,3:a", "1,2,4:a"]), ts_text(["1,2,3:a", "4,5,6:b"]))
    message = f", line 10: class 'b' has no case in {re.escape(str(dm.split_path('TRAIN')))}"
    with pytest.raises(DataError, match=re.escape(str(dm.split_path("TEST"))) + message):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("test", "message"),
    [
        (ts_text(classLabel="true a b c"), r": @classLabel \['a', 'b', 'c'\] differs"),
        (ts_text(["1,2,3:4,5,6:a"], univariate="false", after="@dimensions 2"), r": 2 channel\(s\), but"),
    ],
)
def test_ts_test_file_disagreeing_with_train(tmp_path: Path, test: str, message: str) -> None:
    dm = write_ucr(tmp_path, ts_text(), test)
    with pytest.raises(DataError, match=re.escape(str(dm.split_path("TEST"))) + message):
        dm.setup("fit")


def test_mistyped_ucr_name_offline(tmp_path: Path) -> None:
    write_ucr(tmp_path, ts_text(), ts_text())
    (tmp_path / "GunPoint").mkdir()
    (tmp_path / "GunPoint" / "GunPoint_TRAIN.ts").write_text(ts_text())
    dm = UCRArchive(str(tmp_path), "GunPont", url=CLOSED + "/{name}.zip")
    message = (
        rf"unknown data set 'GunPont': .*GunPont_TRAIN\.ts, .*GunPont_TEST\.ts not found; data sets present in "
        rf"{re.escape(str(tmp_path))}: GunPoint, P \(did you mean 'GunPoint'\?\); and downloading "
        rf"{re.escape(CLOSED)}/GunPont\.zip failed \(<urlopen error .*\)\. Offline, put GunPont_TRAIN\.ts and "
        rf"GunPont_TEST\.ts in {re.escape(str(tmp_path / 'GunPont'))}$"
    )
    with pytest.raises(DataError, match=message):
        dm.prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GunPoint", "P"]  # no temporary folder left behind
