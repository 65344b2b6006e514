"""SequentialDigits: shapes, dims, the seeded stratified split, scaling and errors for malformed files."""

import csv
from pathlib import Path

import pytest
import torch
from needs_data import DATA, needs_data

from zoo.data import DataError, SequentialDigits

needs_digits = needs_data("digits/optdigits.tes")


def file_rows() -> torch.Tensor:
    with open(DATA / "digits" / "optdigits.tes", newline="") as f:
        return torch.tensor([[int(v) for v in row] for row in csv.reader(f) if row])


@needs_digits
def test_shapes_dims_and_split() -> None:
    dm = SequentialDigits(data_dir=str(DATA / "digits"), batch_size=32)
    assert dm.dims == {"input_size": 1, "num_classes": 10, "max_steps": 64}
    dm.setup("fit")
    rows = file_rows()
    n = len(rows)
    assert n == 1797
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == n
    counts = torch.bincount(rows[:, 64], minlength=10)
    test_counts = torch.bincount(dm.test_set.tensors[2], minlength=10)
    val_counts = torch.bincount(dm.val_set.tensors[2], minlength=10)
    # stratified: every class contributes round(fraction * n_c) to val and test
    assert test_counts.tolist() == [round(0.2 * c) for c in counts.tolist()]
    assert val_counts.tolist() == [round(0.1 * c) for c in counts.tolist()]
    x, lengths, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64, 1) and x.dtype == torch.float32
    assert lengths.dtype == torch.long and lengths.tolist() == [64] * 32
    assert y.shape == (32,) and y.dtype == torch.long
    train_x = dm.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-5


@needs_digits
def test_raw_scaling_seed_and_disjoint_splits() -> None:
    rows = file_rows()
    a = SequentialDigits(data_dir=str(DATA / "digits"), normalize=False, seed=3)
    b = SequentialDigits(data_dir=str(DATA / "digits"), normalize=False, seed=3)
    c = SequentialDigits(data_dir=str(DATA / "digits"), normalize=False, seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    # every example of the file appears in exactly one split, scaled to [0, 1]
    seen = torch.cat(
        [
            torch.cat([s.tensors[0].squeeze(-1) * 16, s.tensors[2][:, None].float()], 1)
            for s in (a.train_set, a.val_set, a.test_set)
        ]
    )
    key = lambda t: sorted(map(tuple, t.round().long().tolist()))  # noqa: E731
    assert key(seen) == key(rows)
    assert a.train_set.tensors[0].min() >= 0 and a.train_set.tensors[0].max() == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2,3\n", "line 1: expected 65 comma-separated values, found 3"),
        (",".join(["0"] * 64) + ",7\n" + ",".join(["x"] * 65) + "\n", "line 2"),
        (",".join(["17"] * 64) + ",1\n", "line 1: pixel values must be in 0..16"),
        ("\n", "no data rows"),
    ],
)
def test_malformed_file(tmp_path: Path, content: str, message: str) -> None:
    from zoo.data.digits import read_optdigits

    path = tmp_path / "optdigits.tes"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_optdigits(path)
    assert str(path) in str(e.value)


def test_corrupt_file_fails_checksum(tmp_path: Path) -> None:
    (tmp_path / "optdigits.tes").write_text(",".join(["0"] * 64) + ",7\n")
    dm = SequentialDigits(data_dir=str(tmp_path))
    with pytest.raises(DataError, match="optdigits.tes: sha256 .* does not match"):
        dm.setup()
