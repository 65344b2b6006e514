"""At the end of ``test`` each task writes what a user looks at first into the run directory (`zoo.models.reports`):
the classifier a confusion matrix and per-class accuracy, the forecaster a plot of test windows and the naive
forecast's metrics, the language model a text sample. Tiny fits through the CLI (on the shared data where there is
one)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from needs_data import DATA, needs_data

from zoo.cli import main
from zoo.models.reports import run_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
]


def need(name: str) -> pytest.MarkDecorator:
    return needs_data(name)


def assert_png(path: Path) -> None:
    """``path`` is a PNG that decodes to a non-empty RGB(A) image."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0  # not a blank canvas


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_the_run_directory_is_the_loggers_and_there_is_none_without_a_logger(tmp_path: Path) -> None:
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path}
    assert run_dir(L.Trainer(logger=False, **quiet)) is None  # e.g. zoo.hub's evaluation: nothing is written
    trainer = L.Trainer(logger=CSVLogger(tmp_path, name="run"), **quiet)
    assert run_dir(trainer) == tmp_path / "run" / "version_0"


@need("digits")
def test_classifier_writes_the_confusion_matrix_and_per_class_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            f"--data.data_dir={DATA / 'digits'}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--model.hidden_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            *SMALL,
        ]
    )
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert_png(run / "confusion_matrix.png")
    matrix = read_csv(run / "confusion_matrix.csv")
    assert matrix[0] == ["true/predicted", *map(str, range(10))]
    counts = np.array([[int(c) for c in row[1:]] for row in matrix[1:]])
    labels = torch.cat([batch[2] for batch in cli.datamodule.test_dataloader()])
    assert counts.sum() == len(labels) == 359  # every test sample once
    assert counts.sum(axis=1).tolist() == torch.bincount(labels, minlength=10).tolist()  # rows: the true classes
    per_class = read_csv(run / "per_class_accuracy.csv")
    assert per_class[0] == ["class", "samples", "correct", "accuracy"] and len(per_class) == 11
    samples, correct = (np.array([int(r[i]) for r in per_class[1:]]) for i in (1, 2))
    assert samples.tolist() == counts.sum(axis=1).tolist() and correct.tolist() == counts.diagonal().tolist()
    assert correct.sum() / samples.sum() == pytest.approx(float(cli.trainer.callback_metrics["test/acc"]), abs=1e-6)
    assert f"test/confusion_matrix: {run / 'confusion_matrix.png'}" in capsys.readouterr().out  # no image logger


@need("ett")
def test_forecaster_plots_test_windows_and_reports_the_naive_forecast(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # lr 0 keeps the residual model's zero head: its forecast is the naive last value, so the two metrics must agree
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/ett/ln_lstm.yaml"),
            f"--data.path={DATA / 'ett' / 'ETTh1.csv'}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--data.input_len=24",
            "--data.horizon=12",
            "--data.batch_size=512",
            "--model.init_args.hidden_size=8",
            "--optimizer.init_args.lr=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            *SMALL,
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/naive_mse"]) == pytest.approx(float(metrics["test/mse"]), rel=1e-5)
    assert float(metrics["test/naive_mae"]) == pytest.approx(float(metrics["test/mae"]), rel=1e-5)
    out = capsys.readouterr().out
    assert "test naive_mse:" in out and "test mse:" in out
    run = Path(cli.trainer.logger.log_dir)
    assert_png(run / "forecast.png")
    assert f"test/forecast: {run / 'forecast.png'}" in out


def test_language_model_writes_a_text_sample(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/ptb_char/lstm.yaml"),
            "--data=zoo.data.TextFile",
            f"--data.path={text}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--model.hidden_size=16",
            "--data.batch_size=4",
            "--data.bptt=10",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--test_after_fit=true",
            *SMALL,
        ]
    )
    sample = (tmp_path / "runs" / "ptb_char" / "lstm" / "version_0" / "sample.txt").read_text(encoding="utf-8")
    vocab = cli.datamodule.vocab
    assert vocab[-1] == "<unk>" and all(len(s) == 1 for s in vocab[:-1])  # characters, and <unk> for unseen ones
    chars = sample.replace("<unk>", "")
    assert len(chars) + (len(sample) - len(chars)) // len("<unk>") == 300  # 300 tokens
    assert set(chars) <= set(vocab) and len(set(chars)) > 1


@need("digits")
def test_tensorboard_gets_the_confusion_matrix_image_and_the_tables(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            f"--data.data_dir={DATA / 'digits'}",
            f"--trainer.logger={json.dumps(logger)}",
            "--model.hidden_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            *SMALL,
        ]
    )
    run = tmp_path / "lightning_logs" / "version_0"
    events = event_accumulator.EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    (image,) = events.Images("test/confusion_matrix")
    height, width = imread(run / "confusion_matrix.png").shape[:2]
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and (image.width, image.height) == (width, height)
    (text,) = events.Tensors("test/per_class_accuracy/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert table.startswith("| class | samples | correct | accuracy |") and table.count("\n") == 11
