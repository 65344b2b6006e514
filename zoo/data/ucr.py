"""The UCR/UEA time-series classification archive: a reader for its ``.ts`` format and a LightningDataModule.

One DataModule serves every data set of the archive: ``data_dir`` is the archive's folder (holding
``<Name>/<Name>_TRAIN.ts`` and ``<Name>/<Name>_TEST.ts``) and ``name`` picks the data set. Univariate and multivariate,
equal- and variable-length series and missing values (``?`` or ``NaN``) are read; series are batched zero-padded with
their lengths.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .checks import check_counts, parse_number
from .download import DataError, check_file_path, download, verify
from .root import resolve_data_path

UCR_URL = "https://www.timeseriesclassification.com/aeon-toolkit/{name}.zip"

# sha256 of the canonical archive files (the canonical archive files).
KNOWN_SHA256: dict[str, str] = {
    "ArrowHead_TEST.ts": "5417dab42626d41df5e435bb22458c2df40dfad4bcd3b59559bbe72e20e84904",
    "ArrowHead_TRAIN.ts": "a83c470aaf611a5f5284377cce27a5fc9f6292bc3d110257b0fd4905ced5ee72",
    "BasicMotions_TEST.ts": "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc",
    "BasicMotions_TRAIN.ts": "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6",
    "GunPoint_TEST.ts": "79332750788a6227b325b96bd0d70130c8eb707b9731f8d7dec62b7a7d36017e",
    "GunPoint_TRAIN.ts": "f842401779fd9800d247d8b33121a1a4643710a19b24917dbdd9a060ca8630d5",
    "ItalyPowerDemand_TEST.ts": "26122451f87dd0387ef90b18bc8a86c041371b8a1c068004922b939971247144",
    "ItalyPowerDemand_TRAIN.ts": "341269cb7e6cef96846b30e774580beec79addb93848ba360145219115a74b7c",
}

MissingPolicy = Literal["interpolate", "zero", "reject"]
_MISSING_TOKENS = {"?", "nan", "NaN", "NAN"}


@dataclass
class TSFile:
    """The content of one ``.ts`` file.

    ``series[i]`` is a float tensor ``(length_i, channels)`` with NaN at missing values, ``labels[i]`` the index of its
    class in ``class_labels`` (the header's order) and ``lines[i]`` its 1-based line number in ``path``.
    """

    path: Path
    class_labels: list[str]
    channels: int
    series: list[Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)


def _parse_bool(path: Path, lineno: int, key: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise DataError(f"{path}, line {lineno}: @{key} must be true or false, got {value!r}")
    return value.lower() == "true"


def read_ts(path: str | os.PathLike) -> TSFile:
    """Read a classification ``.ts`` file (sktime/aeon format); raise `DataError` naming the line at fault."""
    path = Path(path)
    header: dict[str, str] = {}
    class_labels: list[str] | None = None
    channels: int | None = None
    out: TSFile | None = None
    seen_data, data_line = False, 0
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file ({e}); the file is corrupt") from e
    lines = text.splitlines()
    if not text.strip():
        raise DataError(f"{path}: empty file, expected a .ts header, @data and the cases")
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if seen_data and line.startswith("@"):
            raise DataError(f"{path}, line {lineno}: header line {line.split()[0]!r} after @data")
        if not seen_data:
            if not line.startswith("@"):
                raise DataError(f"{path}, line {lineno}: expected a header line (@...) or @data before the data")
            key, _, value = line[1:].partition(" ")
            key, value = key.lower(), value.strip()
            if key == "data":
                if class_labels is None:
                    raise DataError(f"{path}, line {lineno}: @data before @classLabel; the header is incomplete")
                if "dimensions" in header:
                    channels = int(header["dimensions"])
                    if channels > 1 and header.get("univariate", "").lower() == "true":
                        raise DataError(f"{path}, line {lineno}: @univariate true, but @dimensions {channels}")
                elif _parse_bool(path, lineno, "univariate", header.get("univariate", "true")):
                    channels = 1
                out = TSFile(path, class_labels, channels or 0, header=header)
                seen_data, data_line = True, lineno
                continue
            header[key] = value
            if key == "classlabel":
                flag, *labels = value.split()
                if not flag or not _parse_bool(path, lineno, "classLabel", flag):
                    raise DataError(f"{path}, line {lineno}: @classLabel false: not a classification data set")
                if not labels or len(set(labels)) != len(labels):
                    raise DataError(f"{path}, line {lineno}: @classLabel must list distinct labels, got {value!r}")
                class_labels = labels
            elif key == "timestamps" and _parse_bool(path, lineno, "timeStamps", value):
                raise DataError(f"{path}, line {lineno}: @timeStamps true is not supported")
            elif key == "dimensions" and not (value.isdigit() and int(value) > 0):
                raise DataError(f"{path}, line {lineno}: @dimensions must be a positive integer, got {value!r}")
            elif key == "serieslength" and not (value.isdigit() and int(value) > 0):
                raise DataError(f"{path}, line {lineno}: @seriesLength must be a positive integer, got {value!r}")
            continue
        _read_case(out, line, lineno)
    if out is None:
        raise DataError(f"{path}, line {len(lines)}: no @data line by the end; the file is truncated or not a .ts file")
    if not out.series:
        raise DataError(f"{path}, line {data_line}: no cases after @data (empty split)")
    return out


def _read_case(out: TSFile, line: str, lineno: int) -> None:
    """Parse one data line ``v,v,...:v,v,...:label`` into ``out``."""
    path = out.path
    *dims, label = line.split(":")
    if not dims:
        raise DataError(f"{path}, line {lineno}: malformed case, expected values and ':<class label>'")
    if not out.channels:
        out.channels = len(dims)
    if len(dims) != out.channels:
        raise DataError(
            f"{path}, line {lineno}: {len(dims)} channel(s), but the header / first case has {out.channels}"
        )
    label = label.strip()
    if label not in out.class_labels:
        raise DataError(
            f"{path}, line {lineno}: class label {label!r} is not one of the header's {out.class_labels} "
            "(a truncated line or a malformed case)"
        )
    cols = []
    for d, chunk in enumerate(dims):
        values = []
        for j, tok in enumerate(chunk.split(",")):
            tok = tok.strip()
            if tok in _MISSING_TOKENS:
                values.append(math.nan)
                continue
            values.append(parse_number(tok, f"{path}, line {lineno}: channel {d + 1}, value {j + 1}"))
        cols.append(values)
    lengths = {len(c) for c in cols}
    if len(lengths) != 1:
        raise DataError(f"{path}, line {lineno}: the channels have different lengths {[len(c) for c in cols]}")
    length = lengths.pop()
    if out.header.get("equallength", "").lower() == "true":
        expected = out.header.get("serieslength")
        if expected and length != int(expected):
            raise DataError(f"{path}, line {lineno}: length {length}, but the header has @seriesLength {expected}")
        if out.series and length != len(out.series[0]):
            raise DataError(
                f"{path}, line {lineno}: length {length}, but @equalLength true and the first case (line "
                f"{out.lines[0]}) has length {len(out.series[0])}"
            )
    out.series.append(torch.tensor(cols, dtype=torch.float32).T.contiguous())
    out.labels.append(out.class_labels.index(label))
    out.lines.append(lineno)


def pad_series(series: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack ``(T_i, C)`` series into a zero-padded ``(N, T_max, C)`` tensor and their lengths ``(N,)``."""
    lengths = torch.tensor([len(s) for s in series], dtype=torch.long)
    x = torch.zeros(len(series), int(lengths.max()), series[0].shape[1])
    for i, s in enumerate(series):
        x[i, : len(s)] = s
    return x, lengths


def collate_padded(batch: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Collate ``(x, length, y)`` items into ``(x, lengths, y)``, trimming the padding to the batch's longest series."""
    x = torch.stack([b[0] for b in batch])
    lengths = torch.stack([b[1] for b in batch])
    y = torch.stack([b[2] for b in batch])
    return x[:, : int(lengths.max())], lengths, y


def interpolate_missing(x: Tensor, lengths: Tensor) -> Tensor:
    """Fill NaNs in each channel of each padded series ``(N, T, C)`` by linear interpolation over its valid prefix.

    Missing values before the first (after the last) observed value take that value; a channel with no observed value
    stays NaN.
    """
    x = x.clone()
    for i, n in enumerate(lengths.tolist()):
        for c in range(x.shape[2]):
            v = x[i, :n, c]
            miss = torch.isnan(v)
            if miss.any() and not miss.all():
                t = torch.arange(n)
                v[miss] = torch.from_numpy(np.interp(t[miss].numpy(), t[~miss].numpy(), v[~miss].numpy())).float()
    return x


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` with ``round(fraction * n_k)`` cases of every class ``k`` in ``val`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(round(fraction * len(idx)), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


class UCRArchive(L.LightningDataModule):
    """A classification data set of the UCR/UEA archive, batched as ``(x, lengths, y)``.

    Args:
        data_dir: the archive's folder (a relative one under the data root: `zoo.data.root`), holding
            ``<name>/<name>_TRAIN.ts`` and ``<name>/<name>_TEST.ts``.
        name: the data set, e.g. ``GunPoint`` or ``BasicMotions``.
        batch_size: cases per batch.
        val_fraction: share of the canonical TRAIN split held out (stratified by class, seeded) for validation.
        seed: seed of the validation split.
        normalize: standardize every channel with the mean and std of the training cases' valid values.
        missing: what to do with missing values (``?`` / ``NaN``): ``"interpolate"`` linearly within each series
            (a channel with no observed value becomes 0 after normalization), ``"zero"`` fill with 0 after
            normalization (the training mean), ``"reject"`` raise `DataError` naming the file and line.
        url: where to download ``<name>.zip`` from (``{name}`` is substituted) when the files are absent; ``None``
            never downloads.
        sha256: expected sha256 per file name (``{"<name>_TRAIN.ts": ..., "<name>_TEST.ts": ...}``); the four data
            sets in ``KNOWN_SHA256`` are always checked.
        num_workers: DataLoader workers.

    ``dims`` is ``{"input_size": channels, "num_classes": K, "max_steps": longest series in TRAIN and TEST}``. Class
    labels map to ``0..K-1`` in the order of the header's ``@classLabel`` (``class_labels`` holds them).
    """

    def __init__(
        self,
        data_dir: str = "ucr_uea",
        name: str = "GunPoint",
        batch_size: int = 16,
        val_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
        missing: MissingPolicy = "interpolate",
        url: str | None = UCR_URL,
        sha256: dict[str, str] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if missing not in ("interpolate", "zero", "reject"):
            raise ValueError(f"missing must be 'interpolate', 'zero' or 'reject', got {missing!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_counts(f"UCRArchive({data_dir}, {name})", {"batch_size": batch_size}, {"num_workers": num_workers})
        self.data_dir = resolve_data_path(data_dir)
        self.name = name
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.normalize = normalize
        self.missing = missing
        self.url = url
        self.sha256 = {**KNOWN_SHA256, **(sha256 or {})}
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] | None = None
        self._files: tuple[TSFile, TSFile] | None = None
        self.class_labels: list[str] = []
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    # ------------------------------------------------------------------------------------------------ files

    def split_path(self, split: str) -> Path:
        """Path of the ``TRAIN`` or ``TEST`` file."""
        return self.data_dir / self.name / f"{self.name}_{split}.ts"

    def _present(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir() if (p / f"{p.name}_TRAIN.ts").is_file())

    def prepare_data(self) -> None:
        """Download and extract ``<name>.zip`` unless both files are present; verify both files."""
        paths = [self.split_path("TRAIN"), self.split_path("TEST")]
        for p in paths:
            check_file_path(p)
        if not all(p.is_file() for p in paths):
            self._download()
        for p in paths:
            verify(p, self.sha256.get(p.name))

    def _download(self) -> None:
        present = self._present()
        missing = [str(p) for p in (self.split_path("TRAIN"), self.split_path("TEST")) if not p.is_file()]
        where = f"{', '.join(missing)} not found; data sets present in {self.data_dir}: {', '.join(present) or 'none'}"
        close = difflib.get_close_matches(self.name, present, n=1)
        if close:
            where += f" (did you mean {close[0]!r}?)"
        if self.url is None:
            raise DataError(f"unknown data set {self.name!r}: {where} (downloading is off: url=None)")
        url = self.url.format(name=self.name)
        dest = self.data_dir / self.name
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            workdir = tempfile.TemporaryDirectory(dir=self.data_dir)  # same file system: the final moves are atomic
        except OSError as e:
            raise DataError(
                f"unknown data set {self.name!r}: {where}; and {self.data_dir} is not writable ({e}), so {url} "
                "was not downloaded"
            ) from e
        with workdir as tmp:
            archive = Path(tmp) / f"{self.name}.zip"
            try:
                download(url, archive)
            except DataError as e:  # e names the temporary folder, gone once this block exits: report its cause
                raise DataError(
                    f"unknown data set {self.name!r}: {where}; and downloading {url} failed ({e.__cause__ or e}). "
                    f"Offline, put {self.name}_TRAIN.ts and {self.name}_TEST.ts in {dest}"
                ) from e
            try:
                with zipfile.ZipFile(archive) as zf:
                    members = {Path(m).name: m for m in zf.namelist()}
                    for split in ("TRAIN", "TEST"):
                        fname = f"{self.name}_{split}.ts"
                        if fname not in members:
                            raise DataError(f"{url}: the archive has no {fname} (it holds {sorted(members)})")
                        part = Path(tmp) / fname
                        with zf.open(members[fname]) as src, open(part, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        verify(part, self.sha256.get(fname))
            except zipfile.BadZipFile as e:
                raise DataError(f"{url}: not a valid zip file ({e}); the download is truncated or corrupt") from e
            dest.mkdir(parents=True, exist_ok=True)
            for split in ("TRAIN", "TEST"):
                fname = f"{self.name}_{split}.ts"
                (Path(tmp) / fname).replace(dest / fname)

    def _read(self) -> tuple[TSFile, TSFile]:
        if self._files is None:
            self.prepare_data()
            train, test = read_ts(self.split_path("TRAIN")), read_ts(self.split_path("TEST"))
            if train.class_labels != test.class_labels:
                raise DataError(
                    f"{test.path}: @classLabel {test.class_labels} differs from {train.path}'s {train.class_labels}"
                )
            if train.channels != test.channels:
                raise DataError(f"{test.path}: {test.channels} channel(s), but {train.path} has {train.channels}")
            unseen = sorted(set(test.labels) - set(train.labels))
            if unseen:
                line = test.lines[test.labels.index(unseen[0])]
                raise DataError(
                    f"{test.path}, line {line}: class {train.class_labels[unseen[0]]!r} has no case in {train.path}, "
                    "so no model can learn it"
                )
            self._files = (train, test)
            self.class_labels = train.class_labels
        return self._files

    @property
    def dims(self) -> dict[str, int]:
        """``{"input_size": C, "num_classes": K, "max_steps": T_longest}`` (reads, or downloads, the data)."""
        train, test = self._read()
        longest = max(len(s) for s in train.series + test.series)
        return {"input_size": train.channels, "num_classes": len(train.class_labels), "max_steps": longest}

    # ------------------------------------------------------------------------------------------------ tensors

    def _check_missing(self, f: TSFile) -> None:
        for s, line in zip(f.series, f.lines, strict=True):
            if torch.isnan(s).any():
                raise DataError(f"{f.path}, line {line}: missing value (? or NaN) and missing='reject'")

    def setup(self, stage: str | None = None) -> None:
        """Split TRAIN into train/val, fit the per-channel normalization on train, build the three datasets."""
        if self._splits is not None:
            return
        train_file, test_file = self._read()
        if self.missing == "reject":
            self._check_missing(train_file)
            self._check_missing(test_file)
        labels = torch.tensor(train_file.labels)
        tr_idx, va_idx = stratified_split(labels, self.val_fraction, self.seed)
        if len(va_idx) == 0 or len(tr_idx) == 0:
            raise DataError(
                f"{train_file.path}: {len(labels)} case(s) cannot give non-empty train and validation splits "
                f"with val_fraction={self.val_fraction}"
            )
        x, lengths = pad_series(train_file.series)
        x_test, len_test = pad_series(test_file.series)
        if self.missing == "interpolate":
            x, x_test = interpolate_missing(x, lengths), interpolate_missing(x_test, len_test)
        channels = x.shape[2]
        if self.normalize:
            valid = _valid_mask(x[tr_idx], lengths[tr_idx])
            vals = x[tr_idx]
            count = valid.sum((0, 1)).clamp_min(1)
            mean = torch.where(valid, vals, 0.0).sum((0, 1)) / count
            var = torch.where(valid, (vals - mean) ** 2, 0.0).sum((0, 1)) / count
            std = var.sqrt()
            self.mean, self.std = mean, torch.where(std > 0, std, torch.ones_like(std))
        else:
            self.mean, self.std = torch.zeros(channels), torch.ones(channels)
        x, x_test = self._finish(x, lengths), self._finish(x_test, len_test)
        y, y_test = labels, torch.tensor(test_file.labels)
        self._splits = {
            "train": TensorDataset(x[tr_idx], lengths[tr_idx], y[tr_idx]),
            "val": TensorDataset(x[va_idx], lengths[va_idx], y[va_idx]),
            "test": TensorDataset(x_test, len_test, y_test),
        }

    def _finish(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Normalize, set remaining NaNs (missing values) to 0 and the padding to 0."""
        x = (x - self.mean) / self.std
        x = torch.nan_to_num(x, nan=0.0)
        return x * _valid_pad(lengths, x.shape[1]).unsqueeze(-1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate_padded,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _valid_pad(lengths: Tensor, steps: int) -> Tensor:
    """``(N, T)`` float mask, 1 where ``t < lengths[n]``."""
    return (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).float()


def _valid_mask(x: Tensor, lengths: Tensor) -> Tensor:
    """``(N, T, C)`` bool mask of observed values inside each series' length."""
    return (_valid_pad(lengths, x.shape[1]).unsqueeze(-1) > 0) & ~torch.isnan(x)
