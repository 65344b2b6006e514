"""Multivariate time-series forecasting from a CSV file (ETT and any CSV of that shape): a LightningDataModule.

A window of ``input_len`` past rows of the feature columns predicts the next ``horizon`` rows of the target columns.
The split follows the ETT code (Zhou et al. 2021): consecutive train / val / test parts, val starting ``input_len`` rows
before the end of train and test ``input_len`` rows before the end of val, so that every row of val and test is
predicted; the scaling (per column, like sklearn's StandardScaler) is fitted on the train part only.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .checks import check_counts, parse_number
from .download import DataError, ensure_file
from .root import resolve_data_path

# Canonical sources and sha256 of the files whose names are known.
KNOWN_FILES: dict[str, tuple[str, str]] = {
    "ETTh1.csv": (
        "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv",
        "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    ),
}

MissingPolicy = Literal["reject", "ffill", "interpolate"]
SplitPart = int | float | str
_MISSING_TOKENS = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None"}
_DAYS = {"M": 30, "D": 1}


@contextmanager
def _open_csv(path: Path) -> Iterator[Iterator[list[str]]]:
    """A `csv.reader` over ``path`` (UTF-8, a BOM allowed) whose decoding and format errors become `DataError`."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            yield reader
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 text file ({e}); the file is corrupt") from e
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not a readable CSV row ({e})") from e


def _repeated(names: Sequence[str]) -> list[str]:
    """The names that occur more than once in ``names``, in order of first occurrence."""
    return [n for n in dict.fromkeys(names) if names.count(n) > 1]


ROW_LABELS = ("date", "datetime", "timestamp", "time", "year", "month", "week", "day", "index")


def _row_label(header: list[str]) -> str | None:
    """``date_column: auto``: ``date`` where the header has it, else its first column if that is named like a row label
    (`ROW_LABELS`, any case), else None."""
    if "date" in header:
        return "date"
    return header[0] if header and header[0].lower() in ROW_LABELS else None


class WindowDataset(Dataset):
    """Sliding windows over one series without copying it: item ``i`` is ``(x[i:i+L], y[i+L:i+L+H])``.

    ``x`` is ``(rows, C)`` and ``y`` ``(rows, n_targets)``, both covering the same rows.
    """

    def __init__(self, x: Tensor, y: Tensor, input_len: int, horizon: int) -> None:
        self.x, self.y, self.input_len, self.horizon = x, y, input_len, horizon

    def __len__(self) -> int:
        return max(0, len(self.x) - self.input_len - self.horizon + 1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range 0..{len(self) - 1}")
        end = i + self.input_len
        return self.x[i:end], self.y[end : end + self.horizon]


def fill_missing(values: Tensor, policy: MissingPolicy, path: Path, columns: list[str]) -> Tensor:
    """Fill NaNs column by column: ``ffill`` (leading NaNs take the first value) or ``interpolate`` (linear in the row
    index, the ends take the nearest value); ``reject`` raises `DataError` naming the first missing cell."""
    miss = torch.isnan(values)
    if not miss.any():
        return values
    if policy == "reject":
        row, col = (int(v) for v in miss.nonzero()[0])
        raise DataError(
            f"{path}, line {row + 2}, column {columns[col]!r}: missing value and missing='reject' "
            "(use missing='ffill' or 'interpolate')"
        )
    out = values.clone()
    t = torch.arange(len(values))
    for c in range(values.shape[1]):
        m = miss[:, c]
        if m.all():
            raise DataError(f"{path}, column {columns[c]!r}: every value is missing")
        if not m.any():
            continue
        known_t, known_v = t[~m], values[~m, c]
        if policy == "interpolate":
            filled = np.interp(t[m].numpy(), known_t.numpy(), known_v.numpy())
            out[m, c] = torch.from_numpy(filled).to(values.dtype)
        else:  # ffill: the last known value at or before each row, the first known value before it
            last = torch.searchsorted(known_t, t[m], right=True).sub(1).clamp_min(0)
            out[m, c] = known_v[last]
    return out


class CSVForecasting(L.LightningDataModule):
    """Forecasting windows over a CSV file with a header row, batched as ``(x, y)``.

    Args:
        path: the CSV file (a relative path is read under the data root, `zoo.data.root`; downloaded from its
            canonical source if absent and its name is in ``KNOWN_FILES``); its
            header must name every column once (a repeated or empty name is a `DataError`).
        target: the column(s) to forecast.
        features: the input columns; ``None``: every column but ``date_column``.
        date_column: the column that labels the rows (a timestamp), which is no feature; needed by month/day splits.
            ``"auto"``: ``date`` if the header has it, else the first column if its name is one of `ROW_LABELS`
            (``year``, ``index``, ...), else none (the rows' order alone), said in the log; ``None``: none.
        input_len: rows in each input window.
        horizon: rows to forecast after it.
        split: rows of train, val and test, each an int (rows), a float in (0, 1) (share of the file's rows) or
            ``"<n>M"`` / ``"<n>D"`` (months of 30 days / days, the rows per day inferred from the first two dates).
            The ETT default ``("12M", "4M", "4M")`` is 8640/2880/2880 rows of hourly data; rows after the test part
            are unused.
        missing: missing cells (empty, ``NaN``, ``NA``): ``"reject"`` raises `DataError`, ``"ffill"`` carries the
            last value forward, ``"interpolate"`` interpolates linearly. ``inf`` (or a number beyond float64) is a
            `DataError` under every policy.
        scale: standardize every column with the train part's mean and std.
        batch_size, num_workers: DataLoader settings (train windows are shuffled).
        sha256: expected sha256 of the file (defaults to the known one for the names in ``KNOWN_FILES``).
        predict_path: a CSV to forecast from (resolved like ``path``): ``predict`` forecasts the ``horizon`` rows after
            its last ``input_len`` rows. It must have the feature and target columns (and the date column, if
            ``path`` has one); it is scaled with the statistics of ``path``'s train part. ``None``: ``predict`` runs
            on every test window (one origin per window, with the actual values).

    ``dims`` is ``{"input_size": C, "output_size": n_targets, "horizon": H, "max_steps": input_len}``; ``target_mean``
    and ``target_std`` (after ``setup``) map normalized targets back to the original scale.
    """

    def __init__(
        self,
        path: str = "ett/ETTh1.csv",
        target: list[str] | str = "OT",
        features: list[str] | None = None,
        date_column: str | None = "auto",
        input_len: int = 96,
        horizon: int = 24,
        split: Sequence[SplitPart] = ("12M", "4M", "4M"),
        missing: MissingPolicy = "reject",
        scale: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        sha256: str | None = None,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        if missing not in ("reject", "ffill", "interpolate"):
            raise ValueError(f"missing must be 'reject', 'ffill' or 'interpolate', got {missing!r}")
        check_counts(
            f"CSVForecasting({path})",
            {"input_len": input_len, "horizon": horizon, "batch_size": batch_size},
            {"num_workers": num_workers},
        )
        if len(split) != 3:
            raise ValueError(f"split must give train, val and test, got {split!r}")
        self.path = resolve_data_path(path)
        self.target = [target] if isinstance(target, str) else list(target)
        self.features = None if features is None else list(features)
        for option, names in (("target", self.target), ("features", self.features or [])):
            twice = _repeated(names)
            if twice:
                raise DataError(f"{self.path}: {option} names {', '.join(map(repr, twice))} more than once")
        self.date_column = date_column  # "auto" is resolved against the header by `_columns`
        self.input_len = input_len
        self.horizon = horizon
        self.split = tuple(split)
        self.missing = missing
        self.scale = scale
        self.batch_size = batch_size
        self.num_workers = num_workers
        url, known = KNOWN_FILES.get(self.path.name, (None, None))
        self.url = url
        self.sha256 = sha256 or known
        self.predict_path = None if predict_path is None else resolve_data_path(predict_path)
        self.dates: list[str] = []
        self._header: list[str] | None = None
        self._datasets: dict[str, WindowDataset] | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.borders: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------------------------------------ columns

    def prepare_data(self) -> None:
        """Download the file if absent (known names only) and verify its sha256."""
        ensure_file(self.path, self.url, self.sha256)

    def _columns(self) -> list[str]:
        """The header, checked for the date, target and feature columns."""
        if self._header is None:
            self.prepare_data()
            with _open_csv(self.path) as reader:
                header = next(reader, None)
            if not header:
                raise DataError(f"{self.path}: empty file, expected a header row")
            header = [h.strip() for h in header]
            if "" in header:
                raise DataError(f"{self.path}, line 1: column {header.index('') + 1} of the header has no name")
            twice = _repeated(header)
            if twice:
                raise DataError(
                    f"{self.path}, line 1: the header names column(s) {', '.join(map(repr, twice))} more than once; "
                    "rename them so that every column has its own name"
                )
            if self.date_column == "auto":
                self.date_column = _row_label(header)
                how = f"column {self.date_column!r} labels" if self.date_column else "no column labels"
                rank_zero_info(f"{self.path}: {how} the rows (date_column: auto); --data.date_column sets one")
            wanted = [*self.target, *(self.features or []), *([self.date_column] if self.date_column else [])]
            absent = [c for c in wanted if c not in header]
            if absent:
                raise DataError(f"{self.path}: no column {', '.join(map(repr, absent))}; its columns: {header}")
            self._header = header
        return self._header

    @property
    def feature_columns(self) -> list[str]:
        """The input columns, in order."""
        return self.features or [c for c in self._columns() if c != self.date_column]

    @property
    def target_index(self) -> list[int]:
        """The position of every target column among the feature columns (a `ValueError` if one is not a feature)."""
        absent = [c for c in self.target if c not in self.feature_columns]
        if absent:
            raise ValueError(f"targets {absent} are not among the features {self.feature_columns}")
        return [self.feature_columns.index(c) for c in self.target]

    @property
    def dims(self) -> dict[str, int]:
        """``{"input_size": C, "output_size": n_targets, "horizon": H, "max_steps": input_len}``.

        Reads and checks the whole file (`setup`): the CLI reads ``dims`` to build the model, so a bad file fails
        there, before a trainer or a run folder exists.
        """
        self.setup()
        return {
            "input_size": len(self.feature_columns),
            "output_size": len(self.target),
            "horizon": self.horizon,
            "max_steps": self.input_len,
        }

    # ------------------------------------------------------------------------------------------------ reading

    def _read(self, path: Path | None = None) -> tuple[Tensor, list[str], list[str]]:
        """The used columns of ``path`` (default: ``self.path``) as a float64 tensor ``(rows, n)`` (NaN where
        missing), their names and every row's date (none without a date column).

        Another file than ``path`` (``predict_path``) is checked for the columns that ``path`` has."""
        header = self._columns()
        used = list(dict.fromkeys([*self.feature_columns, *self.target]))
        if path is None:
            path = self.path
        else:
            ensure_file(path)
            with _open_csv(path) as reader:
                header = [h.strip() for h in next(reader, None) or []]
            wanted = [*used, *([self.date_column] if self.date_column else [])]
            absent = [c for c in wanted if c not in header]
            if absent:
                raise DataError(
                    f"{path}: no column {', '.join(map(repr, absent))}, which {self.path} has and the model reads; "
                    f"its columns: {header}"
                )
        idx = [header.index(c) for c in used]
        date_idx = header.index(self.date_column) if self.date_column else None
        rows: list[list[float]] = []
        dates: list[str] = []
        with _open_csv(path) as reader:
            next(reader)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {line}: {len(row)} field(s), the header has {len(header)} "
                        "(a truncated or malformed row)"
                    )
                values = []
                for i, col in zip(idx, used, strict=True):
                    tok = row[i].strip()
                    if tok in _MISSING_TOKENS:
                        values.append(math.nan)
                        continue
                    values.append(parse_number(tok, f"{path}, line {line}, column {col!r}"))
                rows.append(values)
                if date_idx is not None:
                    dates.append(row[date_idx].strip())
        if not rows:
            raise DataError(f"{path}: no data rows after the header")
        return torch.tensor(rows, dtype=torch.float64), used, dates

    def _rows_per_day(self, dates: list[str]) -> float:
        if self.date_column is None or len(dates) < 2:
            raise DataError(f"{self.path}: a split in months or days needs a date column with two rows or more")
        try:
            step = (datetime.fromisoformat(dates[1]) - datetime.fromisoformat(dates[0])).total_seconds()
        except ValueError as e:
            raise DataError(f"{self.path}, column {self.date_column!r}: cannot read the first dates ({e})") from e
        if step <= 0:
            raise DataError(f"{self.path}, column {self.date_column!r}: the first two dates are not increasing")
        return 86400.0 / step

    def _split_rows(self, n_rows: int, dates: list[str]) -> list[int]:
        out = []
        for part in self.split:
            if isinstance(part, str):
                m = re.fullmatch(r"\s*(\d+)\s*([MD])\s*", part)
                if m is None:
                    raise ValueError(f"split part {part!r}: expected an int, a fraction or '<n>M' / '<n>D'")
                rows = int(m.group(1)) * _DAYS[m.group(2)] * self._rows_per_day(dates)
                if not float(rows).is_integer():
                    raise DataError(f"{self.path}: {part} is not a whole number of rows ({rows})")
                out.append(int(rows))
            elif isinstance(part, float):
                if not 0.0 < part < 1.0:
                    raise ValueError(f"split part {part}: a fraction must lie in (0, 1)")
                out.append(int(part * n_rows))
            else:
                out.append(int(part))
        if sum(out) > n_rows:
            raise DataError(f"{self.path}: the split {self.split} needs {sum(out)} rows, the file has {n_rows}")
        return out

    def setup(self, stage: str | None = None) -> None:
        """Read the file, split it, fit the scaling on train and build the window datasets."""
        if self._datasets is not None:
            return
        values, used, dates = self._read()
        self.dates = dates
        values = fill_missing(values, self.missing, self.path, used)
        n_train, n_val, n_test = self._split_rows(len(values), dates)
        L_ = self.input_len
        self.borders = {
            "train": (0, n_train),
            "val": (n_train - L_, n_train + n_val),
            "test": (n_train + n_val - L_, n_train + n_val + n_test),
        }
        train = values[:n_train]
        if self.scale:
            mean, std = train.mean(0), train.std(0, correction=0)
            std = torch.where(std > 0, std, torch.ones_like(std))
        else:
            mean, std = torch.zeros(len(used)), torch.ones(len(used))
        data = ((values - mean) / std).float()
        self.mean, self.std = mean.float(), std.float()
        self._used = used
        feat = [used.index(c) for c in self.feature_columns]
        tgt = [used.index(c) for c in self.target]
        x, y = data[:, feat], data[:, tgt]
        self._datasets = {}
        for name, (lo, hi) in self.borders.items():
            ds = WindowDataset(x[max(lo, 0) : hi], y[max(lo, 0) : hi], L_, self.horizon)
            if lo < 0 or len(ds) == 0:
                raise DataError(
                    f"{self.path}: the {name} part (rows {lo}..{hi}) holds no window of input_len={L_} + "
                    f"horizon={self.horizon} rows (empty split); lengthen it or shorten the windows"
                )
            self._datasets[name] = ds

    @property
    def target_mean(self) -> Tensor:
        """The target columns' scaling mean ``(n_targets,)`` (after ``setup``)."""
        self.setup()
        return self.mean[[self._used.index(c) for c in self.target]]

    @property
    def target_std(self) -> Tensor:
        """The target columns' scaling std ``(n_targets,)`` (after ``setup``)."""
        self.setup()
        return self.std[[self._used.index(c) for c in self.target]]

    def dataset(self, split: str) -> WindowDataset:
        """The ``train``, ``val`` or ``test`` windows."""
        self.setup()
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The windows that `predict` forecasts from (`predict_origins`), batched as ``(x,)``."""
        x = self.predict_origins().x
        return DataLoader(TensorDataset(x), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_origins(self) -> ForecastOrigins:
        """What ``predict`` forecasts: with ``predict_path``, the window of its last ``input_len`` rows; else every
        test window (as `test` reads them), with the actual values of its horizon."""
        self.setup()
        feat = [self._used.index(c) for c in self.feature_columns]
        if self.predict_path is not None:
            values, used, dates = self._read(self.predict_path)
            if len(values) < self.input_len:
                raise DataError(
                    f"{self.predict_path}: {len(values)} data row(s), a forecast reads the last input_len="
                    f"{self.input_len}"
                )
            last = len(values) - 1
            values = fill_missing(values, self.missing, self.predict_path, used)[-self.input_len :]
            x = ((values - self.mean.double()) / self.std.double()).float()[:, feat]
            return ForecastOrigins(x=x.unsqueeze(0), rows=[last], dates=[dates[-1]] if dates else None, truth=None)
        lo = self.borders["test"][0]
        ds = self.dataset("test")
        tgt = [self._used.index(c) for c in self.target]
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        rows = [lo + i + self.input_len - 1 for i in range(len(ds))]  # the last input row of each window
        truth = torch.stack([ds[i][1] for i in range(len(ds))]) * self.std[tgt] + self.mean[tgt]
        return ForecastOrigins(x=x, rows=rows, dates=[self.dates[r] for r in rows] if self.dates else None, truth=truth)


@dataclass
class ForecastOrigins:
    """The windows that ``predict`` forecasts from: ``x`` (N, input_len, C) scaled as in training; for each, the
    0-based data row of its last input row (the forecast origin) and that row's date (``None`` without a date
    column); ``truth`` (N, horizon, n_targets) on the original scale, ``None`` where unknown."""

    x: Tensor
    rows: list[int]
    dates: list[str] | None
    truth: Tensor | None


def naive_last_value_metrics(datamodule: CSVForecasting, split: str = "test") -> dict[str, float]:
    """MSE and MAE on the normalized scale of the naive forecast repeating each target's last input value."""
    idx = datamodule.target_index
    se = ae = 0.0
    count = 0
    for x, y in DataLoader(datamodule.dataset(split), batch_size=1024):
        pred = x[:, -1:, idx].double()
        err = pred - y.double()
        se += float(err.pow(2).sum())
        ae += float(err.abs().sum())
        count += y.numel()
    return {"mse": se / count, "mae": ae / count}
