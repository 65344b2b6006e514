"""Sequential and permuted MNIST: the 28x28 digits read one pixel per step (784 steps)."""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .checks import check_counts
from .download import DataError, ensure_file
from .root import resolve_data_path

# sha256 of the decompressed idx files: the gzip wrappers differ between mirrors, the content does not (md5 of the
# content: 6bbc9ace898e44ae57da46a324031adb, a25bea736e30d166cdddb491f175f624, 2646ac647ad5339dbf082846283269ea,
# 27ae3e4e09519cfbb04c329615203637, as published for the original files).
FILES = {
    "train-images-idx3-ubyte.gz": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", (60000, 28, 28)),
    "train-labels-idx1-ubyte.gz": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", (60000,)),
    "t10k-images-idx3-ubyte.gz": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", (10000,)),
}


def read_idx_gz(path: str | Path, sha256: str | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Read a gzipped idx file of unsigned bytes (MNIST's format) to a uint8 tensor.

    Checks, each failure a `DataError` naming the file: a readable gzip stream, the idx magic number (unsigned byte
    data), the size announced by the header against the content, ``shape`` if given, and ``sha256`` of the decompressed
    content if given.
    """
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a complete gzip file ({e}); delete it to download it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header truncated ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(
            f"{path}: the idx header announces {'x'.join(map(str, dims))} bytes of data ({expected} in all), "
            f"the file has {len(raw)}; it is truncated or corrupt"
        )
    if shape is not None and dims != tuple(shape):
        raise DataError(f"{path}: shape {dims}, expected {tuple(shape)}")
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise DataError(
                f"{path}: sha256 of the decompressed content {got} does not match the expected {sha256}; "
                "the file is corrupt. Delete it to download it again."
            )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(dims)


# Mean and standard deviation of the 60k training images' pixels scaled to [0, 1] (tests/test_data_mnist.py checks them)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class PixelSequences(Dataset):
    """Images as sequences of one pixel per step, in ``permutation`` order: items (x, length, y), x scaled to [0, 1],
    then, with ``normalize``, standardized to (x − mean) / std with the training set's `MNIST_MEAN`, `MNIST_STD`."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        permutation: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> None:
        self.images = images.flatten(1)
        self.labels = labels.long()
        self.permutation = permutation
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        x = self.images[i]
        if self.permutation is not None:
            x = x[self.permutation]
        x = x.float().div_(255)
        if self.normalize:
            x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
        return x.unsqueeze(-1), x.shape[0], self.labels[i]


class SequentialMNIST(L.LightningDataModule):
    """MNIST as 784-step sequences of one pixel (row by row), or in a fixed random order (``permuted``).

    The four idx files are read from ``data_dir`` (a relative one under the data root: `zoo.data.root`; downloaded
    from ``base_url`` when absent) and checked: gzip
    integrity, idx header and size, and the sha256 of their decompressed content. Split: the 10k test images are the
    test set; of the 60k training images the last ``val_size`` are the validation set (the usual 50k/10k split), or,
    with ``seed`` set, a seeded random ``val_size`` of them. The permutation of permuted MNIST is
    ``torch.randperm(784)`` drawn from a generator seeded with ``permutation_seed``, the same for all splits; it is
    saved in the DataModule's ``state_dict`` (so in checkpoints) and a loaded one takes precedence.

    Batches are ``(x, lengths, y)``: x float (B, 784, 1), lengths long (B,) (all 784), y long (B,). The pixels are
    scaled to [0, 1] and, with ``normalize`` (default), standardized with the training set's mean and std (0.1307,
    0.3081), so the background is -0.42, not 0: a layer-normalized LSTM reading exact zeros has W_x x = 0 for every
    feature, a zero-variance input whose gradient the norm scales by 1/sqrt(eps) step after step until it overflows
    (NaN); ``normalize=False`` gives the raw [0, 1] pixels.
    """

    base_url = "https://ossci-datasets.s3.amazonaws.com/mnist"

    def __init__(
        self,
        data_dir: str = "mnist",
        batch_size: int = 100,
        permuted: bool = False,
        permutation_seed: int = 0,
        val_size: int = 10000,
        seed: int | None = None,
        num_workers: int = 0,
        base_url: str | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be between 1 and 59999, got {val_size}")
        check_counts(f"SequentialMNIST({data_dir})", {"batch_size": batch_size}, {"num_workers": num_workers})
        self.save_hyperparameters()
        self.data_dir = resolve_data_path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.base_url = (base_url or self.base_url).rstrip("/")
        self.permutation: torch.Tensor | None = None
        if permuted:
            self.permutation = torch.randperm(784, generator=torch.Generator().manual_seed(permutation_seed))
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dims(self) -> dict[str, int]:
        """Input size, number of classes and sequence length."""
        return {"input_size": 1, "num_classes": 10, "max_steps": 784}

    def _file(self, name: str) -> Path:
        """``name`` in ``data_dir``; downloaded (and checked before it is kept) if absent, else checked when read."""
        path = self.data_dir / name
        if path.is_file():
            return path
        sha256, shape = FILES[name]
        return ensure_file(path, f"{self.base_url}/{name}", check=partial(read_idx_gz, sha256=sha256, shape=shape))

    def prepare_data(self) -> None:
        """Download the files that are absent."""
        for name in FILES:
            self._file(name)

    def setup(self, stage: str | None = None) -> None:
        """Read and check the four files and split the training images (once)."""
        if self._data:
            return
        arrays = {name: read_idx_gz(self._file(name), *FILES[name]) for name in FILES}
        images, labels = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
        val_size = self.hparams.val_size
        if self.hparams.seed is None:
            order = torch.arange(len(labels))
        else:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.seed))
        train_idx, val_idx = order[:-val_size].sort().values, order[-val_size:].sort().values
        self._data = {
            "train": (images[train_idx], labels[train_idx]),
            "val": (images[val_idx], labels[val_idx]),
            "test": (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]),
        }

    def dataset(self, split: str) -> PixelSequences:
        """The ``split`` ("train", "val" or "test") as pixel sequences."""
        self.setup()
        return PixelSequences(*self._data[split], self.permutation, self.hparams.normalize)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        return self._loader("test")

    def state_dict(self) -> dict[str, Any]:
        """The pixel permutation (None for sequential MNIST)."""
        return {"permutation": self.permutation}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Use the saved permutation (loaders made afterwards use it)."""
        self.permutation = state_dict["permutation"]
