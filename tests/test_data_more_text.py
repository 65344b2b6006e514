"""text8 / enwik8 (download from a local server, verify, extract, byte vocabulary, 90/5/5) and Hugging Face text."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from localserver import serve

from zoo.data import DataError, Enwik8, HFText, Text8

CORPUS = b"anarchism originated as a term of abuse first used against early working class radicals " * 40


def _zip(folder: Path, member: str, content: bytes) -> tuple[str, str]:
    """Write ``<member>.zip`` holding ``member`` into ``folder``; return the sha256 of the zip and of the content."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{member}.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, content)
    return hashlib.sha256(path.read_bytes()).hexdigest(), hashlib.sha256(content).hexdigest()


def test_text8_downloads_verifies_extracts_and_splits(tmp_path: Path) -> None:
    zip_sha, raw_sha = _zip(tmp_path / "server", "text8", CORPUS)
    with serve(tmp_path / "server") as (url, requests):
        data = Text8(
            data_dir=str(tmp_path / "text8"),
            batch_size=4,
            bptt=10,
            base_url=url,
            zip_sha256=zip_sha,
            raw_sha256=raw_sha,
        )
        data.prepare_data()
        assert data.vocab == sorted(set(CORPUS.decode()))  # every byte value of the whole file
        assert data.dims == {"vocab_size": len(set(CORPUS)), "max_steps": 10}
        n = len(CORPUS)
        assert [len(data.streams[s]) for s in ("train", "valid", "test")] == [
            int(0.9 * n),
            int(0.95 * n) - int(0.9 * n),
            n - int(0.95 * n),
        ]
        joined = torch.cat([data.streams[s] for s in ("train", "valid", "test")])
        assert data.decode(joined) == CORPUS.decode()
        x, y = data.train_dataloader().dataset[0]
        assert x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
        Text8(data_dir=str(tmp_path / "text8"), base_url=url, zip_sha256=zip_sha, raw_sha256=raw_sha).prepare_data()
        assert requests == ["/text8.zip"]  # cached: the second instance downloads nothing


def test_text8_and_enwik8_defaults_are_the_canonical_files() -> None:
    assert Text8().files()[0][1:] == (
        "http://mattmahoney.net/dc/text8.zip",
        "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
    )
    assert Enwik8().raw_sha256 == "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"


def test_corrupt_member_is_rejected(tmp_path: Path) -> None:
    zip_sha, _ = _zip(tmp_path / "server", "enwik8", CORPUS)
    with serve(tmp_path / "server") as (url, _):
        data = Enwik8(data_dir=str(tmp_path / "e"), base_url=url, zip_sha256=zip_sha, raw_sha256="0" * 64)
        with pytest.raises(DataError, match="extracted enwik8 has sha256"):
            data.prepare_data() or data.vocab
    assert not (tmp_path / "e" / "enwik8").exists()


def test_wrong_zip_checksum_is_rejected(tmp_path: Path) -> None:
    _zip(tmp_path / "server", "text8", CORPUS)
    with serve(tmp_path / "server") as (url, _):
        with pytest.raises(DataError, match="sha256"):
            Text8(data_dir=str(tmp_path / "t"), base_url=url, zip_sha256="0" * 64).prepare_data()
    assert not (tmp_path / "t" / "text8.zip").exists()


@pytest.fixture
def text_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = {}
    for split, text in {"train": "hello world\nthe cat sat", "validation": "hello cat", "test": "the dog"}.items():
        files[split] = str(tmp_path / f"{split}.txt")
        Path(files[split]).write_text(text)
    return files


def test_hf_text_char_level_offline(text_files: dict[str, str]) -> None:
    data = HFText("text", data_files=text_files, batch_size=2, bptt=4)
    data.prepare_data()
    assert data.vocab[-1] == "<unk>" and "g" not in data.vocab  # 'g' of "dog" only in test
    assert data.decode(data.streams["train"]) == "hello world\nthe cat sat"
    assert data.streams["test"].tolist().count(data.vocab.index("<unk>")) == 1  # 'g'


def test_hf_text_word_level(text_files: dict[str, str]) -> None:
    data = HFText("text", data_files=text_files, level="word", batch_size=1, bptt=4)
    words = [data.vocab[i] for i in data.streams["valid"].tolist()]
    assert words == ["hello", "cat", "<eos>"]
    assert [data.vocab[i] for i in data.streams["test"].tolist()] == ["the", "<unk>", "<eos>"]


def test_hf_text_errors(text_files: dict[str, str]) -> None:
    with pytest.raises(DataError, match="no column 'content'"):
        HFText("text", data_files=text_files, text_column="content").prepare_data()
    with pytest.raises(DataError, match="no split dev"):
        HFText("text", data_files=text_files, splits={"train": "train", "valid": "dev", "test": "test"}).prepare_data()
    with pytest.raises(DataError, match="could not be loaded"):
        HFText("no-such-user/no-such-dataset").prepare_data()
