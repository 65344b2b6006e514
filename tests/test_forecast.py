"""zoo.data.forecast (CSVForecasting, the naive baseline) and zoo.models.forecaster (Forecaster)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from needs_data import DATA, needs_data

from zoo.data.download import DataError
from zoo.data.forecast import CSVForecasting, WindowDataset, fill_missing, naive_last_value_metrics
from zoo.models.forecaster import Forecaster

ETTH1 = DATA / "ett" / "ETTh1.csv"
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def synthetic_rows(n: int) -> torch.Tensor:
    """``(n, 7)`` float64 values: sines of different periods plus a trend, one column per ETT column."""
    t = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(1, 8, dtype=torch.float64)
    return torch.sin(2 * math.pi * t / (6 + 3 * k)) * k + 0.01 * t * k + 10 * k


def write_csv(path: Path, values: torch.Tensor, columns: list[str] = COLUMNS, cells: dict | None = None) -> Path:
    """An hourly CSV like ETTh1: ``date`` then ``columns``; ``cells[(row, col)]`` overrides a cell's text."""
    lines = ["date," + ",".join(columns)]
    for i, row in enumerate(values.tolist()):
        texts = [repr(v) for v in row]
        for (r, c), text in (cells or {}).items():
            if r == i:
                texts[c] = text
        lines.append(f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00," + ",".join(texts))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "synth.csv", synthetic_rows(96))  # 4 days of hourly rows


def make(path: Path, **kwargs) -> CSVForecasting:
    args = {"input_len": 8, "horizon": 4, "split": ("2D", "1D", "1D"), "batch_size": 16} | kwargs
    return CSVForecasting(str(path), **args)


# ------------------------------------------------------------------------------------------------------- windows


def test_dims_borders_and_window_counts(csv_path: Path) -> None:
    dm = make(csv_path)
    assert dm.dims == {"input_size": 7, "output_size": 1, "horizon": 4, "max_steps": 8}
    dm.setup()
    # ETT borders: val starts input_len rows before the end of train, test input_len rows before the end of val
    assert dm.borders == {"train": (0, 48), "val": (40, 72), "test": (64, 96)}
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [48 - 8 - 4 + 1, 24 - 4 + 1, 24 - 4 + 1]


def test_windows_are_scaled_slices_with_train_statistics(csv_path: Path) -> None:
    raw = synthetic_rows(96)
    dm = make(csv_path, target=["OT", "HULL"], features=["OT", "HUFL", "HULL"])
    assert dm.dims["input_size"] == 3 and dm.dims["output_size"] == 2
    dm.setup()
    cols = [COLUMNS.index(c) for c in ("OT", "HUFL", "HULL")]
    mean, std = raw[:48].mean(0), raw[:48].std(0, correction=0)  # fitted on the 48 train rows only
    scaled = ((raw - mean) / std).float()
    x, y = dm.dataset("test")[5]
    lo = 64 + 5
    torch.testing.assert_close(x, scaled[lo : lo + 8, cols])
    torch.testing.assert_close(y, scaled[lo + 8 : lo + 12][:, [COLUMNS.index("OT"), COLUMNS.index("HULL")]])
    torch.testing.assert_close(dm.target_mean, mean[[6, 1]].float())
    torch.testing.assert_close(dm.target_std, std[[6, 1]].float())
    x_last, y_last = dm.dataset("test")[len(dm.dataset("test")) - 1]
    torch.testing.assert_close(y_last[-1], scaled[95, [6, 1]])  # the last window ends on the last test row


def test_windows_are_views_of_one_tensor(csv_path: Path) -> None:
    dm = make(csv_path)
    ds = dm.dataset("train")
    x, y = ds[3]
    assert x.untyped_storage().data_ptr() == ds.x.untyped_storage().data_ptr()
    assert y.untyped_storage().data_ptr() == ds.y.untyped_storage().data_ptr()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_window_dataset_by_hand() -> None:
    series = torch.arange(10.0).unsqueeze(1)
    ds = WindowDataset(series, series * 10, input_len=3, horizon=2)
    assert len(ds) == 6
    x, y = ds[2]
    assert x.flatten().tolist() == [2.0, 3.0, 4.0] and y.flatten().tolist() == [50.0, 60.0]


def test_loaders_batch_shapes(csv_path: Path) -> None:
    dm = make(csv_path, batch_size=5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 8, 7) and y.shape == (5, 4, 1) and x.dtype == torch.float32
    assert sum(len(b[0]) for b in dm.val_dataloader()) == len(dm.dataset("val"))


@pytest.mark.parametrize("split, rows", [((40, 20, 30), (40, 20, 30)), ((0.5, 0.25, 0.25), (48, 24, 24))])
def test_split_in_rows_and_fractions(csv_path: Path, split: tuple, rows: tuple) -> None:
    dm = make(csv_path, split=split)
    dm.setup()
    n_tr, n_va, n_te = rows
    assert dm.borders["train"] == (0, n_tr) and dm.borders["test"] == (n_tr + n_va - 8, n_tr + n_va + n_te)


@needs_data("ett/ETTh1.csv")
def test_etth1_standard_split() -> None:
    dm = CSVForecasting(str(ETTH1), input_len=96, horizon=96)
    dm.setup()
    assert dm.borders == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}  # 12/4/4 months
    assert len(dm.dataset("test")) == 2880 - 96 + 1  # the 2785 test windows of the ETT literature


# ------------------------------------------------------------------------------------------------------- missing


def test_fill_missing_by_hand() -> None:
    nan = math.nan
    values = torch.tensor([[nan, 1.0], [2.0, nan], [nan, nan], [6.0, 4.0], [nan, 5.0]], dtype=torch.float64)
    ffill = fill_missing(values, "ffill", Path("f.csv"), ["a", "b"])
    assert ffill.tolist() == [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [6.0, 4.0], [6.0, 5.0]]
    interp = fill_missing(values, "interpolate", Path("f.csv"), ["a", "b"])
    assert interp.tolist() == [[2.0, 1.0], [2.0, 2.0], [4.0, 3.0], [6.0, 4.0], [6.0, 5.0]]
    with pytest.raises(DataError, match=r"f\.csv, line 2, column 'a': missing value"):
        fill_missing(values, "reject", Path("f.csv"), ["a", "b"])
    with pytest.raises(DataError, match=r"f\.csv, column 'a': every value is missing"):
        fill_missing(torch.full((3, 1), nan), "ffill", Path("f.csv"), ["a"])


def test_missing_cells_in_a_csv(tmp_path: Path) -> None:
    raw = synthetic_rows(96)
    path = write_csv(tmp_path / "gaps.csv", raw, cells={(10, 6): "", (11, 6): "NaN"})
    with pytest.raises(DataError, match=r"gaps\.csv, line 12, column 'OT': missing value"):
        make(path).setup()
    dm = make(path, missing="interpolate", scale=False)
    x, _ = dm.dataset("train")[5]  # rows 5..12
    expected = raw[9, 6] + (raw[12, 6] - raw[9, 6]) * torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(x[5:7, 6], expected.float())


# ------------------------------------------------------------------------------------------------------- bad data


def test_absent_column(csv_path: Path) -> None:
    with pytest.raises(DataError, match=r"synth\.csv: no column 'TEMP'; its columns: \['date', 'HUFL'"):
        _ = make(csv_path, target="TEMP").dims
    with pytest.raises(DataError, match=r"no column 'when'"):
        _ = make(csv_path, date_column="when").dims


def test_non_numeric_value_names_column_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", synthetic_rows(96), cells={(30, 2): "12,5"})
    with pytest.raises(DataError, match=r"bad\.csv, line 32: 9 field\(s\), the header has 8"):
        make(path).setup()
    path = write_csv(tmp_path / "bad.csv", synthetic_rows(96), cells={(30, 2): "high"})
    with pytest.raises(DataError, match=r"bad\.csv, line 32, column 'MUFL': 'high' is not a number"):
        make(path).setup()


def test_truncated_and_empty_files(tmp_path: Path, csv_path: Path) -> None:
    text = csv_path.read_text()
    cut = tmp_path / "cut.csv"
    cut.write_text(text[: len(text) // 2].rsplit(",", 3)[0] + "\n")  # cut in the middle of a row
    with pytest.raises(DataError, match=r"cut\.csv, line \d+: \d field\(s\), the header has 8"):
        make(cut, split=(10, 5, 5)).setup()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        _ = make(empty).dims
    (tmp_path / "head.csv").write_text("date," + ",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match=r"head\.csv: no data rows"):
        make(tmp_path / "head.csv").setup()


def test_split_larger_than_the_file_or_empty(csv_path: Path) -> None:
    with pytest.raises(DataError, match=r"synth\.csv: the split \('3D', '1D', '1D'\) needs 120 rows, the file has 96"):
        make(csv_path, split=("3D", "1D", "1D")).setup()
    with pytest.raises(DataError, match=r"the test part \(rows 64\.\.75\) holds no window.*empty split"):
        make(csv_path, split=(48, 24, 3)).setup()


def test_wrong_checksum(csv_path: Path) -> None:
    with pytest.raises(DataError, match=r"synth\.csv: sha256 .* does not match"):
        _ = make(csv_path, sha256="0" * 64).dims


# ------------------------------------------------------------------------------------------------------- baseline


def test_naive_last_value_by_hand(tmp_path: Path) -> None:
    # a ramp: repeating the last value is off by k at step k of the horizon, in every window
    ramp = torch.arange(96, dtype=torch.float64).unsqueeze(1).repeat(1, 7)
    dm = make(write_csv(tmp_path / "ramp.csv", ramp), scale=False)
    metrics = naive_last_value_metrics(dm)
    assert metrics["mse"] == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert metrics["mae"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    with pytest.raises(ValueError, match=r"targets \['OT'\] are not among the features \['HUFL'\]"):
        naive_last_value_metrics(make(tmp_path / "ramp.csv", features=["HUFL"]))


# ------------------------------------------------------------------------------------------------------- model


class _Adam(Forecaster):
    """Forecaster with a fixed optimizer (the CLI supplies one from the config)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("variant", ["lstm", "ln_lstm", "bn_lstm"])
def test_forecaster_shapes_and_max_steps(variant: str) -> None:
    dims = {"input_size": 3, "output_size": 2, "horizon": 5, "max_steps": 7}
    model = Forecaster(variant, hidden_size=8, dims=dims)
    assert model(torch.randn(4, 7, 3)).shape == (4, 5, 2)
    if variant == "bn_lstm":
        assert model.rnn.options["max_steps"] == 7
    with pytest.raises(ValueError, match=r"Forecaster needs dims"):
        Forecaster(variant, dims={"input_size": 3})


def test_forecaster_trains_and_reports_raw_metrics(csv_path: Path) -> None:
    dm = make(csv_path, target=["OT", "LULL"])
    model = _Adam("ln_lstm", hidden_size=16, dims=dm.dims)
    trainer = L.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/mse"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/mse"]
    assert after < before
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    # recompute every test metric from the model's predictions
    preds, ys = zip(*[(model(x), y) for x, y in dm.test_dataloader()], strict=True)
    pred, y = torch.cat(preds).detach(), torch.cat(ys)
    mean, std = dm.target_mean, dm.target_std
    assert result["test/mse"] == pytest.approx(torch.mean((pred - y) ** 2).item(), rel=1e-4)
    assert result["test/mae"] == pytest.approx(torch.mean((pred - y).abs()).item(), rel=1e-4)
    raw_err = (pred * std + mean) - (y * std + mean)
    assert result["test/mse_raw"] == pytest.approx(torch.mean(raw_err**2).item(), rel=1e-4)
    assert result["test/mae_raw"] == pytest.approx(torch.mean(raw_err.abs()).item(), rel=1e-4)


def test_residual_starts_as_the_naive_forecast_and_ignores_the_level(csv_path: Path) -> None:
    dm = make(csv_path, target=["OT", "HULL"])
    assert dm.target_index == [6, 1]
    model = Forecaster("lstm", hidden_size=8, residual=True, dims=dm.dims)
    with pytest.raises(RuntimeError, match=r"residual=True needs the targets' positions"):
        model(torch.randn(2, 8, 7))
    with pytest.raises(ValueError, match=r"target_index must hold 2 positions in 0\.\.6"):
        model.set_target_index([6, 7])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]  # setup() takes target_index from the DataModule
    assert model.target_index.tolist() == [6, 1]
    naive = naive_last_value_metrics(dm)
    assert result["test/mse"] == pytest.approx(naive["mse"], rel=1e-5)
    assert result["test/mae"] == pytest.approx(naive["mae"], rel=1e-5)
    torch.nn.init.normal_(model.head.weight)  # a non-trivial head: the forecast moves with the level of the input
    x, shift = torch.randn(3, 8, 7), torch.randn(7)
    torch.testing.assert_close(model(x + shift), model(x) + shift[[6, 1]])
    state = model.state_dict()
    assert state["target_index"].tolist() == [6, 1]  # saved in checkpoints


def test_month_split_needs_readable_dates(tmp_path: Path) -> None:
    path = tmp_path / "dates.csv"
    path.write_text("date,OT\nyesterday,1\ntoday,2\n")
    with pytest.raises(DataError, match=r"dates\.csv, column 'date': cannot read the first dates"):
        CSVForecasting(str(path), input_len=1, horizon=1).setup()
    path.write_text("OT\n1\n2\n")
    with pytest.raises(DataError, match=r"dates\.csv: a split in months or days needs a date column"):
        CSVForecasting(str(path), date_column=None, input_len=1, horizon=1).setup()


def test_corrupt_bytes_and_a_bom(tmp_path: Path, csv_path: Path) -> None:
    text = csv_path.read_bytes()
    bad = tmp_path / "binary.csv"
    bad.write_bytes(text[:500] + b"\xff\xfe\x00\x9c" + text[500:])
    with pytest.raises(DataError, match=r"binary\.csv: not a UTF-8 text file .*the file is corrupt"):
        make(bad).setup()
    quote = write_csv(tmp_path / "quote.csv", synthetic_rows(2000), cells={(3, 0): '"5.0'})  # never closed
    with pytest.raises(DataError, match=r"quote\.csv, line \d+: not a readable CSV row \(field larger than"):
        make(quote).setup()
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text)
    assert make(bom).dims["input_size"] == 7  # the first column is still 'date'


# ----------------------------------------------------------------------------------------- date_column: auto


SERIES = [float(v) for v in range(100, 140)]  # 40 rows of one series


@pytest.mark.parametrize(
    ("header", "label", "expected"),
    [
        ("year,volume", lambda i: str(1950 + i), "year"),  # yearly, the first column a year
        ("month,sales", lambda i: f"{2000 + i // 12}-{1 + i % 12:02d}", "month"),  # monthly labels, not ISO dates
        ("Week,count", lambda i: str(3 * i), "Week"),  # weekly, with gaps in the week numbers; any case
        ("index,value", lambda i: str(i), "index"),  # a row index
        ("value", None, None),  # no label column at all
        ("level,value", lambda i: str(i % 3), None),  # a first column that is no row label stays a feature
    ],
    ids=["yearly", "monthly", "weekly-gaps", "index", "single-column", "no-label"],
)
def test_a_csv_without_a_date_column_runs_in_row_order(
    tmp_path: Path, header: str, label, expected: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    target = header.split(",")[-1]
    lines = [header] + [(f"{label(i)}," if label else "") + repr(v) for i, v in enumerate(SERIES)]
    path = tmp_path / "series.csv"
    path.write_text("\n".join(lines) + "\n")
    dm = CSVForecasting(str(path), target=target, input_len=4, horizon=2, split=(20, 8, 12), batch_size=4)
    with caplog.at_level("INFO"):
        dims = dm.dims
    assert dm.date_column == expected
    assert dm.feature_columns == ([target] if expected else header.split(","))
    assert dims["input_size"] == len(dm.feature_columns)
    assert "(date_column: auto)" in caplog.text and (repr(expected) in caplog.text if expected else True)
    x, y = dm.dataset("test")[0]  # row order: the test part's first window starts input_len rows before it
    raw = torch.tensor(SERIES[28 - 4 : 28 + 2], dtype=torch.float32)
    scaled = (raw - dm.mean[-1]) / dm.std[-1]
    torch.testing.assert_close(x[:, dm.feature_columns.index(target)], scaled[:4])
    torch.testing.assert_close(y[:, 0], scaled[4:])


def test_auto_takes_the_date_column_where_there_is_one_and_none_keeps_every_column(csv_path: Path) -> None:
    assert make(csv_path).dims["input_size"] == 7 and make(csv_path).date_column == "auto"  # resolved on reading
    dm = make(csv_path)
    _ = dm.dims
    assert dm.date_column == "date"
    path = csv_path.parent / "years.csv"
    path.write_text("year,OT\n" + "\n".join(f"{1900 + i},{v!r}" for i, v in enumerate(SERIES)) + "\n")
    dm = CSVForecasting(str(path), date_column=None, input_len=4, horizon=2, split=(20, 8, 12))
    assert dm.dims["input_size"] == 2 and dm.feature_columns == ["year", "OT"]  # None: no label, the year is a feature
    with pytest.raises(DataError, match=r"years\.csv, column 'year': cannot read the first dates"):
        CSVForecasting(str(path), input_len=4, horizon=2, split=("1M", "1M", "1M")).setup()  # months need dates
