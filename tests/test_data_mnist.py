"""SequentialMNIST: shapes, splits, the pixel order and permutation, and the checks of the idx files."""

import gzip
from functools import cache
from pathlib import Path

import pytest
import torch
from needs_data import DATA, needs_data

from zoo.data import DataError, SequentialMNIST
from zoo.data.mnist import MNIST_MEAN, MNIST_STD, read_idx_gz

needs_mnist = needs_data("mnist")


@cache
def raw(name: str) -> torch.Tensor:
    """An idx file's data bytes, read independently of zoo (header length from the idx format: 4 + 4 * ndim)."""
    data = gzip.open(DATA / "mnist" / name).read()
    return torch.frombuffer(bytearray(data[4 + 4 * data[3] :]), dtype=torch.uint8)


@cache
def loaded(permuted: bool = False, seed: int | None = None, normalize: bool = False) -> SequentialMNIST:
    dm = SequentialMNIST(data_dir=str(DATA / "mnist"), batch_size=32, permuted=permuted, seed=seed, normalize=normalize)
    dm.setup()
    return dm


@needs_mnist
def test_shapes_and_last_10k_validation() -> None:
    dm = loaded()
    assert dm.dims == {"input_size": 1, "num_classes": 10, "max_steps": 784}
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [50000, 10000, 10000]
    x, lengths, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 784, 1) and x.dtype == torch.float32
    assert lengths.dtype == torch.long and lengths.tolist() == [784] * 32
    assert y.shape == (32,) and y.dtype == torch.long
    images = raw("train-images-idx3-ubyte.gz").view(60000, 784)
    labels = raw("train-labels-idx1-ubyte.gz").long()
    for split, i, j in [("train", 0, 0), ("train", 49999, 49999), ("val", 0, 50000), ("val", 9999, 59999)]:
        x, length, y = dm.dataset(split)[i]
        assert length == 784 and y == labels[j]
        assert torch.equal(x.squeeze(-1), images[j].float() / 255)  # row by row, one pixel per step
    x, _, y = dm.dataset("test")[1234]
    assert torch.equal(x.squeeze(-1), raw("t10k-images-idx3-ubyte.gz").view(10000, 784)[1234].float() / 255)
    assert y == raw("t10k-labels-idx1-ubyte.gz")[1234]


@needs_mnist
def test_normalize_standardizes_with_the_training_statistics() -> None:
    pixels = raw("train-images-idx3-ubyte.gz").double() / 255
    assert pixels.mean().item() == pytest.approx(MNIST_MEAN, abs=5e-5)
    assert pixels.std().item() == pytest.approx(MNIST_STD, abs=5e-5)
    plain, standard = loaded(), loaded(normalize=True)
    assert SequentialMNIST().hparams.normalize  # the default
    for split in ("train", "test"):
        x, _, _ = plain.dataset(split)[3]
        z, _, _ = standard.dataset(split)[3]
        assert torch.allclose(z, (x - MNIST_MEAN) / MNIST_STD)
        assert (z != 0).all()  # no exact zeros: the background is -0.42


@needs_mnist
@pytest.mark.parametrize("variant", ["ln_lstm", "rms_lstm"])
def test_layer_norm_lstm_gradients_on_raw_and_standardized_pixels(variant: str) -> None:
    """Raw pixels: runs of exact zeros give W_x x = 0 and a zero c_t, zero-variance inputs whose gradient the norm
    scales by 1/sqrt(eps) at every step: the gradients explode (inf, then NaN, through ATen's kernels; the compiled
    loop's clamped exp may instead stop at huge finite values); standardized pixels keep every gradient finite and
    moderate."""
    import zoo.nn

    grads = {}
    for normalize in (False, True):
        x = torch.stack([loaded(permuted=True, normalize=normalize).dataset("train")[i][0] for i in range(8)])
        torch.manual_seed(0)
        rnn = zoo.nn.RNN(variant, 1, 16, batch_first=True)
        out, _ = rnn(x[:, :60])
        out[:, -1].sum().backward()
        grads[normalize] = torch.cat([p.grad.flatten() for p in rnn.parameters()])
    raw = grads[False]
    assert not raw.isfinite().all() or raw.abs().max() > 1e6
    assert grads[True].isfinite().all() and grads[True].abs().max() < 1e3


@needs_mnist
def test_seeded_split() -> None:
    a, b = loaded(seed=1), SequentialMNIST(data_dir=str(DATA / "mnist"), seed=1)
    b.setup()
    assert torch.equal(a.dataset("val").labels, b.dataset("val").labels)
    labels = raw("train-labels-idx1-ubyte.gz").long()
    counts = torch.bincount(a.dataset("train").labels, minlength=10) + torch.bincount(a.dataset("val").labels)
    assert torch.equal(counts, torch.bincount(labels))
    assert not torch.equal(a.dataset("val").labels, labels[50000:])


@needs_mnist
def test_permutation() -> None:
    seq, perm = loaded(), loaded(permuted=True)
    p = perm.permutation
    assert torch.equal(p.sort().values, torch.arange(784))
    assert torch.equal(p, SequentialMNIST(permuted=True, permutation_seed=0).permutation)
    assert not torch.equal(p, SequentialMNIST(permuted=True, permutation_seed=1).permutation)
    assert SequentialMNIST().permutation is None
    for split in ("train", "val", "test"):  # the same permutation of the pixels in every split
        assert torch.equal(perm.dataset(split)[7][0], seq.dataset(split)[7][0][p])
    # the permutation travels with the DataModule's state (checkpoints) and a loaded one wins
    other = SequentialMNIST(data_dir=str(DATA / "mnist"), permuted=True, permutation_seed=5)
    other.load_state_dict(perm.state_dict())
    assert torch.equal(other.permutation, p)


def write_idx(path: Path, dims: tuple[int, ...], data: bytes, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(gzip.compress(header + data))


def test_read_idx(tmp_path: Path) -> None:
    path = tmp_path / "ok.gz"
    write_idx(path, (3, 2, 2), bytes(range(12)))
    assert read_idx_gz(path, shape=(3, 2, 2)).tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8))[:-9]), "not a complete gzip file"),
        (lambda p: p.write_bytes(b"plain bytes"), "not a complete gzip file"),
        (lambda p: write_idx(p, (12,), bytes(12), magic=b"\x00\x00\x0d"), "not an idx file of unsigned bytes"),
        (lambda p: write_idx(p, (3, 2, 2), bytes(11)), r"announces 3x2x2 bytes of data \(28 in all\), the file has 27"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00")), "idx header truncated"),
        (lambda p: write_idx(p, (2, 6), bytes(12)), r"shape \(2, 6\), expected \(3, 2, 2\)"),
        (lambda p: write_idx(p, (3, 2, 2), bytes(12)), "sha256 of the decompressed content .* does not match"),
    ],
)
def test_corrupt_idx(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    make(path)
    with pytest.raises(DataError, match=message) as e:
        read_idx_gz(path, sha256="0" * 64, shape=(3, 2, 2))
    assert str(path) in str(e.value)


@needs_mnist
def test_module_rejects_a_corrupt_file(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(DATA / "mnist" / name)
    labels = gzip.open(DATA / "mnist" / "train-labels-idx1-ubyte.gz").read()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: sha256 of the decompressed content"):
        SequentialMNIST(data_dir=str(tmp_path)).setup()
