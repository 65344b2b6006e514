"""Data-parallel training (DDP) on CPU with 2 processes (gloo), through `train.py`: the same results as one process.

Language modelling: every rank reads its own contiguous rows, so a 2-rank fit equals a 1-rank fit with the same global
batch (weights and carried state; bn_lstm synchronizes its batch statistics), and validation on 2 ranks gives the
1-rank bits per character, and rank zero writes the text sample. Classification: Lightning's distributed sampler halves
each rank's epoch, checkpoints and logs are written once, the test's confusion matrix sums the ranks' counts, and a
2-rank run resumes on 1 rank.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from needs_data import DATA, needs_data

from zoo.data.text import BPTTWindows

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0"]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend"
)


def _train(cwd: Path, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ddp = ["--trainer.strategy=ddp"] if devices > 1 else []
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
    done = subprocess.run([*cmd, *ddp, *QUIET], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metric(run: Path, key: str) -> float:
    """The last logged value of ``key`` in the run's only CSV log."""
    (log,) = run.glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(log.open()) if r.get(key)]
    return float(rows[-1][key])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_serves_a_contiguous_block_of_the_rows(world: int) -> None:
    stream = torch.arange(1000)
    whole = BPTTWindows(stream, 8, 7)
    parts = [BPTTWindows(stream, 8, 7, rank, world) for rank in range(world)]
    assert all(len(p) == len(whole) for p in parts)  # every rank runs as many steps
    for i in range(len(whole)):
        for j in range(2):
            torch.testing.assert_close(torch.cat([p[i][j] for p in parts]), whole[i][j], rtol=0, atol=0)


def test_rows_must_split_evenly() -> None:
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        BPTTWindows(torch.arange(1000), 6, 7, 0, 4)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away with it".split()
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    return path


def test_language_model_on_two_ranks_equals_one_rank(tmp_path: Path, text: Path) -> None:
    lm = [
        "--data=zoo.data.TextFile",
        f"--data.path={text}",
        "--data.batch_size=4",
        "--data.bptt=16",
        "--model=zoo.models.LanguageModel",
        "--model.variant=bn_lstm",
        "--model.hidden_size=16",
        # float64 and SGD: one rank runs the fused path, two the synchronized step-by-step one, whose float32
        # roundings differ by about 1e-5 of the gradients (more on some CPUs, e.g. AVX-512); in float64 by about
        # 1e-14, so the weights agree to 1e-9, while a wrong average or split moves them by lr times the gradients.
        "--trainer.precision=64",
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.5",
    ]
    lm.append("--trainer.limit_val_batches=3")  # (and validate: the same batches as fit)
    fit = [*lm, "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    _train(tmp_path, "fit", *fit, "--name=one")
    _train(tmp_path, "fit", *fit, "--name=two", devices=2)
    one = torch.load(tmp_path / "runs/one/checkpoints/last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "runs/two/checkpoints/last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == 4
    for name, value in one["state_dict"].items():  # weights and running statistics
        assert value.dtype == torch.float64 or not value.is_floating_point(), name
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-9, atol=1e-9, msg=name)
    assert two["carried_state"][0].shape == (1, 4, 16)  # all 4 rows, gathered from the ranks
    for a, b in zip(two["carried_state"], one["carried_state"], strict=True):  # (a forward pass of those weights)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    ckpt = str(tmp_path / "runs/two/checkpoints/last.ckpt")
    for split, command in (("val", "validate"), ("test", "test")):
        for devices in (1, 2):
            _train(tmp_path, command, *lm, f"--ckpt_path={ckpt}", f"--name={split}{devices}", devices=devices)
        bpc = [_metric(tmp_path / f"runs/{split}{devices}", f"{split}/bpc") for devices in (1, 2)]
        assert bpc[0] == pytest.approx(bpc[1], rel=1e-6)  # (the logged metrics are float32)
    samples = [(tmp_path / f"runs/test{devices}/version_0/sample.txt").read_text() for devices in (1, 2)]
    assert samples[0] == samples[1] and len(samples[0]) > 0  # rank zero's sample, from the same weights and seed
    assert bpc[0] != pytest.approx(_metric(tmp_path / "runs/val1", "val/bpc"), rel=1e-6)  # two different splits
    assert _metric(tmp_path / "runs/val1", "val/bpc") == pytest.approx(_metric(tmp_path / "runs/two", "val/bpc"))


@needs_data("digits")
def test_classifier_splits_the_epoch_writes_once_and_resumes_on_one_rank(tmp_path: Path) -> None:
    args = [
        "--model=zoo.models.SequenceClassifier",
        "--model.variant=seqbn_lstm",
        "--model.hidden_size=8",
        "--data=zoo.data.SequentialDigits",
        f"--data.data_dir={DATA / 'digits'}",
        "--data.batch_size=128",  # 1258 training images: 10 batches on 1 rank, 5 on each of 2
        "--trainer.limit_val_batches=1",
        "--name=digits",
    ]
    _train(tmp_path, "fit", *args, "--trainer.max_epochs=1", devices=2)
    run = tmp_path / "runs/digits"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert [p.name for p in run.glob("version_*")] == ["version_0"]  # one logger: rank zero's
    assert 0.0 <= _metric(run, "val/acc") <= 1.0

    # the test's confusion matrix sums the ranks' counts: 359 test images, padded by the sampler to 2 x 180
    _train(tmp_path, "test", *args, "--ckpt_path=last", "--name=digits_test", devices=2)
    with (tmp_path / "runs/digits_test/version_0/confusion_matrix.csv").open() as f:
        counts = [int(c) for row in list(csv.reader(f))[1:] for c in row[1:]]
    assert sum(counts) == 360

    _train(tmp_path, "fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last")
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 5 + 10)  # epoch 1 (the second) on one rank: 10 more steps
