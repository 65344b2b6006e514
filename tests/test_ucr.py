"""zoo.data.ucr: the .ts reader, UCRArchive (splits, normalization, padding, missing values), download and bad data."""

from __future__ import annotations

import math
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from localserver import serve
from needs_data import DATA, needs_data

from zoo.data.download import DataError, sha256sum
from zoo.data.ucr import KNOWN_SHA256, UCRArchive, collate_padded, interpolate_missing, read_ts, stratified_split

ARCHIVE = DATA / "ucr_uea"
needs_archive = needs_data("ucr_uea")

HEADER = (
    "#a comment\n@problemName {name}\n@timeStamps false\n@missing {missing}\n@univariate {uni}\n"
    "{extra}@classLabel true b a c\n@data\n"
)  # 7 lines (plus ``extra``): the first case is on line 8


def write_ts(folder: Path, name: str, split: str, cases: list[str], uni: bool = True, extra: str = "") -> Path:
    """Write ``<folder>/<name>/<name>_<split>.ts`` with a small header and the given data lines."""
    path = folder / name / f"{name}_{split}.ts"
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = "true" if any("?" in c or "NaN" in c for c in cases) else "false"
    head = HEADER.format(name=name, missing=missing, uni=str(uni).lower(), extra=extra)
    path.write_text(head + "".join(c + "\n" for c in cases))
    return path


# ------------------------------------------------------------------------------------------------------- reader


def test_read_ts_multivariate_variable_length_missing(tmp_path: Path) -> None:
    path = write_ts(tmp_path, "Toy", "TRAIN", ["1,2,3:4,5,6:a", "7,?:8,9:c", "0.5:NaN:b"], uni=False)
    f = read_ts(path)
    assert f.class_labels == ["b", "a", "c"] and f.channels == 2
    assert f.labels == [1, 2, 0]  # header order b, a, c -> 0, 1, 2
    assert f.lines == [8, 9, 10]
    torch.testing.assert_close(f.series[0], torch.tensor([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]))
    assert f.series[1].shape == (2, 2) and math.isnan(f.series[1][1, 0]) and f.series[1][1, 1] == 9.0
    assert f.series[2].shape == (1, 2) and math.isnan(f.series[2][0, 1])


@needs_archive
@pytest.mark.parametrize(
    "name, n_train, n_test, dims",
    [
        ("GunPoint", 50, 150, {"input_size": 1, "num_classes": 2, "max_steps": 150}),
        ("BasicMotions", 40, 40, {"input_size": 6, "num_classes": 4, "max_steps": 100}),
        ("ItalyPowerDemand", 67, 1029, {"input_size": 1, "num_classes": 2, "max_steps": 24}),
        ("ArrowHead", 36, 175, {"input_size": 1, "num_classes": 3, "max_steps": 251}),
    ],
)
def test_real_archive_sizes_and_dims(name: str, n_train: int, n_test: int, dims: dict[str, int]) -> None:
    dm = UCRArchive(str(ARCHIVE), name, url=None)
    assert dm.dims == dims
    dm.setup()
    assert len(dm._splits["train"]) + len(dm._splits["val"]) == n_train
    assert len(dm._splits["test"]) == n_test


@needs_archive
def test_gunpoint_first_case_matches_the_file() -> None:
    path = ARCHIVE / "GunPoint" / "GunPoint_TRAIN.ts"
    data_line = next(line for line in path.read_text().splitlines() if line and line[0] not in "#@")
    *values, label = data_line.replace(":", ",").split(",")
    f = read_ts(path)
    torch.testing.assert_close(f.series[0][:, 0], torch.tensor([float(v) for v in values]))
    assert f.class_labels == ["1", "2"] and f.labels[0] == ["1", "2"].index(label)


# ------------------------------------------------------------------------------------------------------- splits


def test_stratified_split_is_seeded_disjoint_and_proportional() -> None:
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(35))
    assert torch.bincount(labels[va], minlength=3).tolist() == [2, 4, 1]
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, stratified_split(labels, 0.2, seed=4)[1])


def test_normalization_uses_train_valid_positions_only(tmp_path: Path) -> None:
    # variable-length, 2 channels; a huge value in the TEST file must not enter the statistics
    train = [f"{i},{i + 1},{2 * i}:{10 * i},{-i},{i * i}:{'ab'[i % 2]}" for i in range(10)]
    train += ["1,2:3,4:a", "5:6:b"]  # shorter series: padding must stay out of the statistics
    write_ts(tmp_path, "Toy", "TRAIN", train, uni=False)
    write_ts(tmp_path, "Toy", "TEST", ["1000,1000:1000,1000:a"], uni=False)
    dm = UCRArchive(str(tmp_path), "Toy", batch_size=4, val_fraction=0.25, url=None)
    assert dm.dims == {"input_size": 2, "num_classes": 3, "max_steps": 3}
    dm.setup()
    x, lengths, _ = dm._splits["train"].tensors
    valid = torch.arange(x.shape[1]) < lengths.unsqueeze(1)
    vals = x[valid]  # (n_valid, C)
    torch.testing.assert_close(vals.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(vals.std(0, correction=0), torch.ones(2), atol=1e-5, rtol=0)
    assert (x[~valid] == 0).all()
    # the statistics are those of the raw training values (recomputed here from the file's cases)
    raw = read_ts(tmp_path / "Toy" / "Toy_TRAIN.ts").series
    tr_idx, _ = stratified_split(torch.tensor(read_ts(tmp_path / "Toy" / "Toy_TRAIN.ts").labels), 0.25, 0)
    pooled = torch.cat([raw[i] for i in tr_idx.tolist()])
    torch.testing.assert_close(dm.mean, pooled.mean(0))
    torch.testing.assert_close(dm.std, pooled.std(0, correction=0))
    x_test = dm._splits["test"].tensors[0]
    torch.testing.assert_close(x_test[0, :2], (torch.full((2, 2), 1000.0) - dm.mean) / dm.std)


def test_collate_trims_padding_to_the_batch() -> None:
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    batch = [(x[0], torch.tensor(2), torch.tensor(1)), (x[1], torch.tensor(3), torch.tensor(0))]
    xb, lengths, y = collate_padded(batch)
    assert xb.shape == (2, 3, 1) and lengths.tolist() == [2, 3] and y.tolist() == [1, 0]
    torch.testing.assert_close(xb, x[:, :3])


def test_loaders_yield_padded_batches_with_lengths(tmp_path: Path) -> None:
    cases = [",".join(str(v) for v in range(1, n + 1)) + f":{'abc'[n % 3]}" for n in range(1, 13)]
    write_ts(tmp_path, "Var", "TRAIN", cases)
    write_ts(tmp_path, "Var", "TEST", cases[:4])
    dm = UCRArchive(str(tmp_path), "Var", batch_size=4, val_fraction=0.25, url=None, normalize=False)
    assert dm.dims["max_steps"] == 12
    xb, lengths, y = next(iter(dm.test_dataloader()))
    assert lengths.tolist() == [1, 2, 3, 4] and xb.shape == (4, 4, 1)
    for row, n in zip(xb[:, :, 0], lengths.tolist(), strict=True):
        assert row[:n].tolist() == list(range(1, n + 1)) and (row[n:] == 0).all()
    assert y.tolist() == [["b", "a", "c"].index("abc"[n % 3]) for n in range(1, 5)]
    seen = sum(len(b[2]) for b in dm.train_dataloader()) + sum(len(b[2]) for b in dm.val_dataloader())
    assert seen == 12


# ------------------------------------------------------------------------------------------------------- missing


def test_interpolate_missing_by_hand() -> None:
    nan = math.nan
    x = torch.tensor([[nan, 1.0, nan, nan, 4.0, nan, 0.0], [nan, nan, nan, 0.0, 0.0, 0.0, 0.0]]).unsqueeze(-1)
    out = interpolate_missing(x, torch.tensor([5, 3]))
    torch.testing.assert_close(out[0, :5, 0], torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0]))  # edge: nearest, inside: linear
    assert math.isnan(out[0, 5, 0])  # past the length: untouched
    assert torch.isnan(out[1, :3, 0]).all()  # no observed value: stays missing


@pytest.mark.parametrize("missing, expected", [("interpolate", [1.0, 2.0, 3.0]), ("zero", [1.0, None, 3.0])])
def test_missing_policies(tmp_path: Path, missing: str, expected: list) -> None:
    write_ts(tmp_path, "Miss", "TRAIN", ["1,?,3:a", "1,2,3:b", "3,2,1:a", "3,2,1:b"])
    write_ts(tmp_path, "Miss", "TEST", ["1,NaN,3:a"])
    dm = UCRArchive(str(tmp_path), "Miss", val_fraction=0.5, missing=missing, url=None, normalize=False)
    dm.setup()
    got = dm._splits["test"].tensors[0][0, :, 0].tolist()
    assert got == [0.0 if e is None else e for e in expected]  # "zero": 0 after normalization (here: none)


def test_missing_reject_names_file_and_line(tmp_path: Path) -> None:
    write_ts(tmp_path, "Miss", "TRAIN", ["1,2,3:a", "1,?,3:b"])
    write_ts(tmp_path, "Miss", "TEST", ["1,2,3:a"])
    dm = UCRArchive(str(tmp_path), "Miss", val_fraction=0.5, missing="reject", url=None)
    with pytest.raises(DataError, match=r"Miss_TRAIN\.ts, line 9: missing value"):
        dm.setup()


# ------------------------------------------------------------------------------------------------------- bad data


@pytest.mark.parametrize(
    "cases, uni, extra, message",
    [
        (["1,2:3,4:a", "1,2:b"], False, "", r"line 9: 1 channel\(s\), but the header / first case has 2"),
        (["1,2:3,4:a"], False, "@dimensions 3\n", r"line 9: 2 channel\(s\), but the header / first case has 3"),
        (["1,2,3:a", "1,x,3:b"], True, "", r"line 9: channel 1, value 2: 'x' is not a number"),
        (["1,2,3:a", "1,2,3:z"], True, "", r"line 9: class label 'z' is not one of"),
        (["1,2,3:a", "1,2,3"], True, "", r"line 9: malformed case"),
        (["1,2,3:a", "1,2:b"], True, "@equalLength true\n@seriesLength 3\n", r"line 11: length 2, but the header"),
        (["1,2:3:a"], False, "", r"line 8: the channels have different lengths \[2, 1\]"),
        ([], True, "", r"no cases after @data \(empty split\)"),
    ],
)
def test_bad_ts_files(tmp_path: Path, cases: list[str], uni: bool, extra: str, message: str) -> None:
    path = write_ts(tmp_path, "Bad", "TRAIN", cases, uni=uni, extra=extra)
    with pytest.raises(DataError, match=r"Bad_TRAIN\.ts.*" + message):
        read_ts(path)


def test_truncated_ts_file(tmp_path: Path) -> None:
    path = tmp_path / "T_TRAIN.ts"
    path.write_text("@problemName T\n@classLabel true a b\n")  # cut before @data
    with pytest.raises(DataError, match=r"T_TRAIN\.ts, line 2: no @data line by the end; the file is truncated"):
        read_ts(path)
    path.write_bytes(b"@problemName T\n\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"T_TRAIN\.ts: not a text file"):
        read_ts(path)


def test_train_and_test_headers_must_agree(tmp_path: Path) -> None:
    write_ts(tmp_path, "Two", "TRAIN", ["1:2:a", "1:2:b"], uni=False)
    write_ts(tmp_path, "Two", "TEST", ["1:a"])
    with pytest.raises(DataError, match=r"Two_TEST\.ts: 1 channel\(s\), but .*Two_TRAIN\.ts has 2"):
        _ = UCRArchive(str(tmp_path), "Two", url=None).dims


def test_empty_validation_split(tmp_path: Path) -> None:
    write_ts(tmp_path, "One", "TRAIN", ["1,2:a"])
    write_ts(tmp_path, "One", "TEST", ["1,2:a"])
    with pytest.raises(DataError, match=r"One_TRAIN\.ts: 1 case\(s\) cannot give non-empty train and validation"):
        UCRArchive(str(tmp_path), "One", url=None).setup()


def test_unknown_name_lists_present_data_sets(tmp_path: Path) -> None:
    write_ts(tmp_path, "Alpha", "TRAIN", ["1:a"])
    write_ts(tmp_path, "Beta", "TRAIN", ["1:a"])
    with pytest.raises(DataError, match=r"unknown data set 'Gamma'.*present in .*: Alpha, Beta"):
        _ = UCRArchive(str(tmp_path), "Gamma", url=None).dims


def test_wrong_checksum_of_a_known_file(tmp_path: Path) -> None:
    write_ts(tmp_path, "GunPoint", "TRAIN", ["1,2:b", "1,2:a"])
    write_ts(tmp_path, "GunPoint", "TEST", ["1,2:b"])
    with pytest.raises(DataError, match=r"GunPoint_TRAIN\.ts: sha256 .* does not match"):
        _ = UCRArchive(str(tmp_path), "GunPoint", url=None).dims


def test_user_sha256(tmp_path: Path) -> None:
    train = write_ts(tmp_path, "Own", "TRAIN", ["1,2:b", "1,2:a"])
    test = write_ts(tmp_path, "Own", "TEST", ["1,2:b"])
    good = {"Own_TRAIN.ts": sha256sum(train), "Own_TEST.ts": sha256sum(test)}
    assert UCRArchive(str(tmp_path), "Own", url=None, sha256=good).dims["num_classes"] == 3
    with pytest.raises(DataError, match=r"Own_TEST\.ts: sha256"):
        _ = UCRArchive(str(tmp_path), "Own", url=None, sha256={**good, "Own_TEST.ts": "0" * 64}).dims


# ------------------------------------------------------------------------------------------------------- download


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / "serve"``; yields (base url, folder)."""
    root = tmp_path / "serve"
    root.mkdir()
    with serve(root) as (url, _):
        yield url, root


@needs_archive
def test_download_extracts_and_verifies(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    with zipfile.ZipFile(root / "GunPoint.zip", "w") as zf:
        for split in ("TRAIN", "TEST"):
            zf.write(ARCHIVE / "GunPoint" / f"GunPoint_{split}.ts", f"GunPoint_{split}.ts")
    data_dir = tmp_path / "archive"
    dm = UCRArchive(str(data_dir), "GunPoint", url=base + "/{name}.zip")
    assert dm.dims == {"input_size": 1, "num_classes": 2, "max_steps": 150}
    for split in ("TRAIN", "TEST"):
        cached = data_dir / "GunPoint" / f"GunPoint_{split}.ts"
        assert sha256sum(cached) == KNOWN_SHA256[cached.name]
    assert sorted(p.name for p in data_dir.iterdir()) == ["GunPoint"]  # no zip or partial file left behind
    (root / "GunPoint.zip").unlink()  # cached: a second DataModule needs no server
    assert UCRArchive(str(data_dir), "GunPoint", url=base + "/{name}.zip").dims["max_steps"] == 150


@needs_archive
def test_download_rejects_a_corrupt_file_in_the_zip(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    corrupt = tmp_path / "GunPoint_TEST.ts"
    shutil.copy(ARCHIVE / "GunPoint" / "GunPoint_TEST.ts", corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:-100])  # truncated
    with zipfile.ZipFile(root / "GunPoint.zip", "w") as zf:
        zf.write(ARCHIVE / "GunPoint" / "GunPoint_TRAIN.ts", "GunPoint/GunPoint_TRAIN.ts")
        zf.write(corrupt, "GunPoint/GunPoint_TEST.ts")
    data_dir = tmp_path / "archive"
    with pytest.raises(DataError, match=r"GunPoint_TEST\.ts: sha256 .* does not match"):
        _ = UCRArchive(str(data_dir), "GunPoint", url=base + "/{name}.zip").dims
    assert not (data_dir / "GunPoint").exists()  # nothing half-extracted is cached


def test_download_of_a_bad_zip_or_a_missing_name(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    (root / "Junk.zip").write_bytes(b"not a zip at all")
    data_dir = tmp_path / "archive"
    data_dir.mkdir()
    with pytest.raises(DataError, match=r"Junk\.zip: not a valid zip file"):
        _ = UCRArchive(str(data_dir), "Junk", url=base + "/{name}.zip").dims
    with pytest.raises(
        DataError, match=r"unknown data set 'Nope'.*present in .*: none; and downloading .*/Nope\.zip failed"
    ):
        _ = UCRArchive(str(data_dir), "Nope", url=base + "/{name}.zip").dims


def test_download_into_an_unwritable_folder(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    (tmp_path / "a_file").write_text("")
    data_dir = tmp_path / "a_file" / "archive"  # cannot be created
    with pytest.raises(DataError, match=r"Foo_TRAIN\.ts: .*a_file is a file, expected the directory holding it"):
        _ = UCRArchive(str(data_dir), "Foo", url=base + "/{name}.zip").dims


def test_download_into_a_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(dir: str) -> None:
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr("zoo.data.ucr.tempfile.TemporaryDirectory", refuse)
    message = r"unknown data set .Foo.*: none; and .* is not writable \(.*Permission denied.*\), so .*/Foo\.zip was"
    with pytest.raises(DataError, match=message):
        UCRArchive(str(tmp_path), "Foo", url="http://127.0.0.1:9/{name}.zip").prepare_data()
