"""Language-modelling DataModules: BPTT windows, vocabularies and splits of the real corpora, resume, errors."""

import warnings
from functools import cache
from pathlib import Path

import lightning as L
import pytest
import torch
from needs_data import DATA, needs_data
from torch import nn

from zoo.data import DataError, PennTreebank, TextFile, TinyShakespeare
from zoo.data.text import (
    BPTTWindows,
    WindowLoader,
    encode_char_splits,
    encode_words,
    load_text,
    read_ptb_chars,
    read_words,
)

needs_ptb = needs_data("ptb")
needs_shakespeare = needs_data("tinyshakespeare")


@cache
def ptb(level: str) -> PennTreebank:
    """One loaded PennTreebank per level for the whole session (the char corpus is 10 MB)."""
    dm = PennTreebank(data_dir=str(DATA / "ptb"), level=level, batch_size=16, bptt=35)
    dm.setup()
    return dm


def test_windows_by_hand() -> None:
    # 23 symbols, 3 rows -> 7 steps per row (2 symbols dropped); bptt 4 -> windows of 4 then 2 steps
    w = BPTTWindows(torch.arange(23), batch_size=3, bptt=4)
    assert len(w) == 2
    x0, y0 = w[0]
    x1, y1 = w[1]
    assert x0.tolist() == [[0, 1, 2, 3], [7, 8, 9, 10], [14, 15, 16, 17]]
    assert y0.tolist() == [[1, 2, 3, 4], [8, 9, 10, 11], [15, 16, 17, 18]]
    assert x1.tolist() == [[4, 5], [11, 12], [18, 19]]
    assert y1.tolist() == [[5, 6], [12, 13], [19, 20]]
    # views of the stream, not copies
    assert x0.untyped_storage().data_ptr() == w.data.untyped_storage().data_ptr()
    with pytest.raises(IndexError):
        w[2]


@pytest.mark.parametrize(("n", "rows", "bptt"), [(1000, 7, 10), (1001, 4, 1), (50, 5, 100)])
def test_windows_cover_the_stream(n: int, rows: int, bptt: int) -> None:
    stream = torch.randperm(n)
    w = BPTTWindows(stream, rows, bptt)
    steps = n // rows
    xs, ys = zip(*(w[i] for i in range(len(w))), strict=True)
    for ya, xb in zip(ys, xs[1:], strict=False):
        assert torch.equal(xb[:, 0], ya[:, -1])  # window i+1 continues window i in every row
    for x in xs:
        assert x.shape[0] == rows and x.shape[1] <= bptt
    x_all, y_all = torch.cat(xs, 1), torch.cat(ys, 1)
    expected = stream[: rows * steps].view(rows, steps)
    assert torch.equal(x_all, expected[:, :-1])  # every symbol but the last of each row is an input, once
    assert torch.equal(y_all, expected[:, 1:])  # y is x shifted by one


@needs_ptb
def test_ptb_char() -> None:
    dm = ptb("char")
    assert dm.dims == {"vocab_size": 50, "max_steps": 35}
    assert dm.vocab == sorted(dm.vocab) and dm.vocab[0] == "\n" and "_" in dm.vocab
    for split in ("train", "valid", "test"):
        lines = (DATA / "ptb" / f"ptb.char.{split}.txt").read_text().splitlines()
        lines = [line.split() for line in lines if line.strip()]
        assert len(dm.streams[split]) == sum(len(line) + 1 for line in lines)
        n = sum(len(line) + 1 for line in lines[:3])
        assert dm.decode(dm.streams[split][:n]) == "".join("".join(line) + "\n" for line in lines[:3]).replace("_", " ")
    assert len(dm.streams["train"]) > 5_000_000
    assert dm.decode(dm.encode("the stock fell\n")) == "the stock fell\n"
    with pytest.raises(DataError, match="symbol 'A' is not in the vocabulary"):
        dm.encode("A")


@needs_ptb
def test_ptb_word() -> None:
    dm = ptb("word")
    assert dm.dims == {"vocab_size": 10000, "max_steps": 35}
    assert "<eos>" in dm.vocab and "<unk>" in dm.vocab and dm.vocab == sorted(dm.vocab)
    for split in ("train", "valid", "test"):
        lines = (DATA / "ptb" / f"ptb.{split}.txt").read_text().splitlines()
        words = [w for line in lines for w in line.split() + ["<eos>"]]
        assert dm.decode(dm.streams[split]).split() == [w for w in words if w != "<eos>"]
        assert dm.streams[split][:50].tolist() == [dm.vocab.index(w) for w in words[:50]]
        assert len(dm.streams[split]) == len(words)
    assert len(dm.streams["train"]) == 929_589  # the corpus size every PTB paper reports
    text = "the company said\nit will"
    assert dm.decode(dm.encode(text)) == text


@needs_ptb
def test_ptb_loader_continuity() -> None:
    dm = ptb("char")
    loader = dm.train_dataloader()
    assert len(loader) == -(-(len(dm.streams["train"]) // 16 - 1) // 35)
    it = iter(loader)
    x0, y0 = next(it)
    x1, y1 = next(it)
    assert x0.shape == (16, 35) and x0.dtype == torch.long and y0.dtype == torch.long
    assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(y0[:, :-1], x0[:, 1:])
    steps = len(dm.streams["train"]) // 16
    assert torch.equal(x0[:, 0], dm.streams["train"][0 : 16 * steps : steps])


@needs_shakespeare
def test_tiny_shakespeare() -> None:
    dm = TinyShakespeare(data_dir=str(DATA / "tinyshakespeare"), batch_size=8, bptt=50)
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    assert dm.dims == {"vocab_size": 65, "max_steps": 50}
    assert dm.vocab == sorted(set(text))
    n = len(text)
    a, b = int(0.9 * n), int(0.95 * n)
    assert [len(dm.streams[s]) for s in ("train", "valid", "test")] == [a, b - a, n - b]
    assert dm.decode(dm.streams["valid"]) == text[a:b]
    assert dm.decode(dm.streams["test"][-100:]) == text[-100:]


def test_text_file_char_and_unk(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    text = "abcab\n" * 30 + "xyz\n" * 2  # 188 characters; x, y, z only in the test split
    path.write_text(text)
    dm = TextFile(str(path), level="char", split=(0.8, 0.1, 0.1), batch_size=2, bptt=5)
    assert dm.vocab == ["\n", "a", "b", "c", "<unk>"]
    assert dm.dims == {"vocab_size": 5, "max_steps": 5}
    a, b = int(0.8 * len(text)), int(0.9 * len(text))
    assert dm.decode(dm.streams["train"]) == text[:a]
    assert dm.decode(dm.streams["test"]) == text[b:].replace("x", "<unk>").replace("y", "<unk>").replace("z", "<unk>")
    assert dm.encode("ax").tolist() == [1, 4]


def test_text_file_word(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat\nthe dog sat\n" * 5 + "a bird flew\n\n")
    dm = TextFile(str(path), level="word", split=(0.8, 0.1, 0.1), batch_size=1, bptt=3)
    assert dm.vocab == ["<eos>", "cat", "dog", "sat", "the", "<unk>"]
    words = ("the cat sat <eos> the dog sat <eos> " * 5 + "a bird flew <eos>").split()
    a, b = int(0.8 * len(words)), int(0.9 * len(words))
    assert dm.streams["train"].tolist() == [dm.vocab.index(w) for w in words[:a]]
    assert dm.streams["test"].tolist() == [dm.vocab.index(w) if w in dm.vocab else 5 for w in words[b:]]
    assert dm.decode(dm.encode("the cat\nsat")) == "the cat\nsat"


class _Recorder(L.LightningModule):
    """A tiny LM that records the first column of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 4)
        self.out = nn.Linear(4, 64)
        self.seen: list[list[int]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(x[:, 0].tolist())
        return nn.functional.cross_entropy(self.out(self.emb(x)).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(path: Path, ckpt: Path | None, callbacks: list | None = None) -> _Recorder:
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=callbacks is not None,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        trainer.fit(model, datamodule=TextFile(str(path), batch_size=4, bptt=10), ckpt_path=ckpt)
    return model


def test_resume_mid_epoch(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(48 + i % 61) for i in range(1200)))  # window starts all differ
    windows = TextFile(str(path), batch_size=4, bptt=10).windows("train")
    epoch = [windows[i][0][:, 0].tolist() for i in range(len(windows))]
    assert len(epoch) == 27
    every_11 = L.pytorch.callbacks.ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=11, save_top_k=-1)
    assert _fit(path, None, [every_11]).seen == epoch + epoch
    # resume from the checkpoints saved after 11 steps (epoch 1) and after 33 steps (window 6 of epoch 2)
    assert _fit(path, tmp_path / "step=11.ckpt").seen == epoch[11:] + epoch
    assert _fit(path, tmp_path / "step=33.ckpt").seen == epoch[6:]


def test_loader_state_round_trip() -> None:
    loader = WindowLoader(BPTTWindows(torch.arange(100), 2, 7))
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.state_dict() == {"position": 3}
    fresh = WindowLoader(BPTTWindows(torch.arange(100), 2, 7))
    fresh.load_state_dict(loader.state_dict())
    rest = [x[0, 0].item() for x, _ in fresh]
    assert rest == [21, 28, 35, 42]
    assert [x[0, 0].item() for x, _ in fresh] == [0, 7, 14, 21, 28, 35, 42]  # the next epoch starts over
    fresh.load_state_dict({"position": len(fresh)})  # saved at the end of an epoch
    assert len(list(fresh)) == len(fresh)


# errors -------------------------------------------------------------------------------------------------------------


def test_missing_file_without_source(tmp_path: Path) -> None:
    dm = TextFile(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"nope.txt does not exist and there is no source"):
        _ = dm.dims


def test_missing_file_offline(tmp_path: Path) -> None:
    # port 9 on localhost (discard) is closed: the download fails as it does offline
    dm = PennTreebank(data_dir=str(tmp_path / "ptb"), level="word", base_url="http://127.0.0.1:9/ptb")
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "ptb.train.txt does not exist and could not be downloaded from http://127.0.0.1:9/ptb/ptb.train.txt" in msg
    assert f"put a copy of that file (sha256 {PennTreebank.sha256['ptb.train.txt']}) at {tmp_path}/ptb" in msg
    assert not any((tmp_path / "ptb").iterdir())


def test_checksum_mismatch(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.char.{split}.txt").write_text("a b _ c\n")
    with pytest.raises(DataError, match=r"ptb.char.train.txt: sha256 \w+ does not match the expected e313d914"):
        _ = PennTreebank(data_dir=str(tmp_path)).dims


def test_empty_split(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghij")  # 10 characters: 9 / 0 / 1
    with pytest.raises(DataError, match=r"tiny.txt: the valid split is empty"):
        _ = TextFile(str(path)).dims
    path.write_text("\n")
    with pytest.raises(DataError, match=r"tiny.txt: the train split is empty"):
        _ = TextFile(str(path), level="word").dims


def test_split_too_small_for_batch(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("abcdefghij" * 10)
    dm = TextFile(str(path), batch_size=8, eval_batch_size=4)
    dm.train_dataloader()
    with pytest.raises(DataError, match=r"small.txt: the valid split is too small: a stream of 5 symbols"):
        dm.val_dataloader()


def test_unknown_char_in_valid(tmp_path: Path) -> None:
    paths = {s: tmp_path / f"ptb.char.{s}.txt" for s in ("train", "valid", "test")}
    paths["train"].write_text("a b _ c\nb a\n")
    paths["valid"].write_text("a b\nb _ a\nc q a\n")
    paths["test"].write_text("a\n")
    with pytest.raises(DataError, match=r"ptb.char.valid.txt, line 3: symbol 'q' is not in the training vocabulary"):
        encode_char_splits({s: read_ptb_chars(p) for s, p in paths.items()}, paths)


def test_unknown_char_tiny_shakespeare_style(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text("to be\n" * 30 + "or not\n")  # 187 characters; 'r' and 'n' only on line 31, in valid/test
    with pytest.raises(DataError, match=r"play.txt, line 31: symbol 'r' is not in the training vocabulary"):
        load_text(path, "char", (0.9, 0.05, 0.05), unk=False)


def test_unknown_word(tmp_path: Path) -> None:
    path = tmp_path / "ptb.valid.txt"
    path.write_text(" the cat \n the dog \n")
    words = read_words(path)
    assert words == ["the", "cat", "<eos>", "the", "dog", "<eos>"]
    with pytest.raises(DataError, match=r"ptb.valid.txt, line 2: word 'dog' is not in the training vocabulary"):
        encode_words(words, {"the": 0, "cat": 1, "<eos>": 2}, path)


def test_malformed_ptb_chars(tmp_path: Path) -> None:
    path = tmp_path / "ptb.char.train.txt"
    path.write_text("a b\nab c\n")
    with pytest.raises(DataError, match=r"ptb.char.train.txt, line 2: symbols must be single characters"):
        read_ptb_chars(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc\ndéf\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt, line 2: not valid UTF-8"):
        _ = TextFile(str(path)).dims


def test_eval_bptt_lengthens_only_the_evaluation_windows(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("abcdefghij" * 200)  # 2000 characters: 1800 / 100 / 100
    dm = TextFile(str(path), batch_size=2, bptt=10, eval_batch_size=1, eval_bptt=40)
    train_x, _ = next(iter(dm.train_dataloader()))
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (1, 40) and torch.equal(x[0, 1:], y[0, :-1])
    assert train_x.shape == (2, 10)
    assert dm.dims["max_steps"] == 10  # T_max stays the training length
    with pytest.raises(ValueError, match="eval_bptt must be an integer >= 1"):
        TextFile(str(path), eval_bptt=0)
