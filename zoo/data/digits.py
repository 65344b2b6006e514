"""Sequential digits: the 1797 8x8 UCI optdigits images read one pixel per step (a 64-step task for quick runs)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from .checks import check_counts
from .download import DataError, ensure_file
from .root import resolve_data_path

FILE = "optdigits.tes"
SHA256 = "85f89a0333cbbcf5b1a42f3d4d74013ee35f5e44dbeb5f9b54f78ce5b4f94910"


def read_optdigits(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse an optdigits file (64 comma-separated values 0..16, then the label 0..9, per line) to (pixels, labels).

    Returns ``pixels`` as a uint8 tensor (N, 64) and ``labels`` as a long tensor (N,); raises `DataError` naming the
    file and line for a malformed row.
    """
    rows: list[list[int]] = []
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.strip().split(",")
            if len(fields) != 65:
                raise DataError(f"{path}, line {lineno}: expected 65 comma-separated values, found {len(fields)}")
            try:
                row = [int(v) for v in fields]
            except ValueError as e:
                raise DataError(f"{path}, line {lineno}: {e}") from e
            if not all(0 <= v <= 16 for v in row[:64]) or not 0 <= row[64] <= 9:
                raise DataError(f"{path}, line {lineno}: pixel values must be in 0..16 and the label in 0..9")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no data rows")
    data = torch.tensor(rows, dtype=torch.long)
    return data[:, :64].to(torch.uint8), data[:, 64]


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Split the indices of ``labels`` into ``len(fractions) + 1`` seeded, class-stratified parts.

    Part ``k < len(fractions)`` gets ``round(fractions[k] * n_c)`` of the ``n_c`` examples of every class; the last part
    gets the rest. Each part's indices are sorted.
    """
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for k, frac in enumerate(fractions):
            n = round(frac * len(idx))
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)


class SequentialDigits(L.LightningDataModule):
    """The UCI optdigits test file (1797 images of 8x8 pixels, 10 classes) as 64-step sequences of one pixel.

    The file is read from ``data_dir`` (a relative one under the data root: `zoo.data.root`; downloaded from
    ``base_url``, default UCI, when absent; sha256-verified) and
    split, seeded and stratified by class, into train / val / test (``val_fraction`` and ``test_fraction`` of every
    class go to val and test).
    Pixels are scaled from 0..16 to [0, 1]; with ``normalize`` they are then standardized with the mean and standard
    deviation of the training pixels (one scalar pair, since every step carries one pixel).

    Batches are ``(x, lengths, y)``: x float (B, 64, 1), lengths long (B,) (all 64), y long (B,).
    """

    base_url = "https://archive.ics.uci.edu/ml/machine-learning-databases/optdigits"

    def __init__(
        self,
        data_dir: str = "digits",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
        base_url: str | None = None,
    ) -> None:
        super().__init__()
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}"
            )
        check_counts(f"SequentialDigits({data_dir})", {"batch_size": batch_size}, {"num_workers": num_workers})
        self.save_hyperparameters()
        self.data_dir = resolve_data_path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.base_url = (base_url or self.base_url).rstrip("/")
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.mean = 0.0
        self.std = 1.0

    @property
    def dims(self) -> dict[str, int]:
        """Input size, number of classes and sequence length."""
        return {"input_size": 1, "num_classes": 10, "max_steps": 64}

    @property
    def path(self) -> Path:
        """The optdigits file."""
        return self.data_dir / FILE

    def _file(self) -> Path:
        return ensure_file(self.path, f"{self.base_url}/{FILE}", SHA256)

    def prepare_data(self) -> None:
        """Download the file if it is absent, and verify it."""
        self._file()

    def setup(self, stage: str | None = None) -> None:
        """Read, split and scale the data (once)."""
        if self.train_set is not None:
            return
        pixels, labels = read_optdigits(self._file())
        hp = self.hparams
        val_idx, test_idx, train_idx = stratified_split(labels, (hp.val_fraction, hp.test_fraction), hp.seed)
        x = pixels.float().div_(16.0).unsqueeze(-1)
        if hp.normalize:
            train_x = x[train_idx]
            self.mean, self.std = train_x.mean().item(), train_x.std().item()
            x = (x - self.mean) / self.std
        lengths = torch.full((len(labels),), 64, dtype=torch.long)

        def subset(idx: torch.Tensor) -> TensorDataset:
            return TensorDataset(x[idx], lengths[idx], labels[idx])

        self.train_set, self.val_set, self.test_set = subset(train_idx), subset(val_idx), subset(test_idx)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        self.setup()
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        self.setup()
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        self.setup()
        return self._loader(self.test_set, False)
