"""Downloads of every DataModule from a local HTTP server: verified, cached, and nothing kept when a file is bad."""

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from localserver import serve
from needs_data import DATA, require_data

from zoo.data import DataError, PennTreebank, SequentialDigits, SequentialMNIST, TinyShakespeare, sha256sum


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server of the data root (which must hold the data sets that the tests download)."""
    require_data("digits", "mnist", "ptb", "tinyshakespeare")
    with serve(DATA) as s:
        yield s


@pytest.mark.parametrize(
    ("make", "folder", "names"),
    [
        (
            lambda d, u: PennTreebank(data_dir=d, level="word", base_url=u),
            "ptb",
            ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"],
        ),
        (lambda d, u: TinyShakespeare(data_dir=d, base_url=u), "tinyshakespeare", ["input.txt"]),
        (lambda d, u: SequentialDigits(data_dir=d, base_url=u), "digits", ["optdigits.tes"]),
        (
            lambda d, u: SequentialMNIST(data_dir=d, base_url=u),
            "mnist",
            [
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ],
        ),
    ],
    ids=["ptb", "tinyshakespeare", "digits", "mnist"],
)
def test_download_verifies_and_caches(tmp_path: Path, shared: tuple[str, list[str]], make, folder, names) -> None:
    url, requests = shared
    requests.clear()
    dest = tmp_path / folder
    make(str(dest), f"{url}/{folder}").prepare_data()
    assert sorted(requests) == sorted(f"/{folder}/{n}" for n in names)
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)  # no .part left
    for n in names:
        assert sha256sum(dest / n) == sha256sum(DATA / folder / n)
    requests.clear()
    dm = make(str(dest), f"{url}/{folder}")
    dm.prepare_data()
    dm.setup("fit")  # reads (and checks) the cached files
    assert requests == []
    assert next(iter(dm.train_dataloader()))[0].shape[0] == dm.batch_size


def test_corrupt_download_is_rejected(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    name = "tinyshakespeare/input.txt"
    text = (require_data(name) / name).read_bytes()
    (served / "input.txt").write_bytes(text[:-1] + b"?")  # one byte changed
    dest = tmp_path / "dest"
    with serve(served) as (url, requests):
        with pytest.raises(DataError, match=r"input.txt\.\w+\.part: sha256 \w+ does not match the expected 86c4e6aa"):
            TinyShakespeare(data_dir=str(dest), base_url=url).prepare_data()
    assert requests == ["/input.txt"]
    assert list(dest.iterdir()) == []


def test_corrupt_mnist_content_is_rejected(tmp_path: Path) -> None:
    # the .gz wrapper may differ between mirrors, so the check is on the decompressed content
    served = tmp_path / "served"
    served.mkdir()
    name = "mnist/t10k-labels-idx1-ubyte.gz"
    labels = gzip.open(require_data(name) / name).read()
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
    dest = tmp_path / "dest"
    with serve(served) as (url, _):
        with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz\.\w+\.part: sha256 of the decompressed"):
            SequentialMNIST(data_dir=str(dest), base_url=url)._file("t10k-labels-idx1-ubyte.gz")
    assert list(dest.iterdir()) == []


def test_missing_on_server(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with serve(tmp_path) as (url, _):
        with pytest.raises(DataError, match=r"optdigits.tes does not exist and could not be downloaded from .*404"):
            SequentialDigits(data_dir=str(dest), base_url=url).prepare_data()
    assert list(dest.iterdir()) == []
