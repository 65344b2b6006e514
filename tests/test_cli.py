"""`train.py` end to end on real data (tiny models, few steps): fit writes checkpoints and the resolved config with its
seed, tests the best checkpoint and prints it; validate and test read a checkpoint back; configs compose."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from needs_data import DATA, needs_data

from zoo.cli import ZooCLI, main

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@needs_data("digits")
def test_fit_tests_the_best_checkpoint_then_validate_and_test_read_it(tmp_path: Path) -> None:
    fit = _run(
        tmp_path,
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        f"--data.data_dir={DATA / 'digits'}",
        "--model.hidden_size=8",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--seed_everything=true",
        "--trainer.log_every_n_steps=1",
        *SMALL,
    )
    run = tmp_path / "runs" / "quickstart"
    best = next(line for line in fit.stdout.splitlines() if line.startswith("checkpoint: "))[len("checkpoint: ") :]
    assert Path(best).parent == run / "checkpoints" and Path(best).is_file()
    accuracy = float(next(line for line in fit.stdout.splitlines() if line.startswith("test accuracy: ")).split()[-1])
    assert 0.0 <= accuracy <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()

    checkpoint = torch.load(best, weights_only=True)  # plain types only
    assert checkpoint["hyper_parameters"]["dims"] == {"input_size": 1, "num_classes": 10, "max_steps": 64}
    assert checkpoint["hyper_parameters"]["variant"] == "ln_lstm"
    # the best on val/acc (max) over the two validations
    scores = [c["best_model_score"] for k, c in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    with open(run / "version_0" / "metrics.csv") as f:
        val_acc = [float(row["val/acc"]) for row in csv.DictReader(f) if row["val/acc"]]
    assert len(val_acc) == 2 and scores and float(scores[0]) == max(val_acc)

    config = yaml.safe_load((run / "version_0" / "config.yaml").read_text())
    assert isinstance(config["seed_everything"], int) and config["seed_everything"] is not True  # the seed drawn
    metrics = (run / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_step", "val/acc", "val/loss", "lr-Adam"} <= set(metrics)

    for subcommand in ("validate", "test"):
        out = _run(
            tmp_path,
            subcommand,
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            f"--data.data_dir={DATA / 'digits'}",
            f"--ckpt_path={best}",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            *SMALL,
        )
        split = "val" if subcommand == "validate" else "test"
        assert f"{split}/acc" in out.stdout
    out = _run(
        tmp_path,
        "predict",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        f"--data.data_dir={DATA / 'digits'}",
        f"--ckpt_path={best}",
        *SMALL[:2],
    )
    predictions = torch.load(run / "predictions.pt")  # one class id per test example (20% of the 1797)
    assert f"predictions: {Path('runs') / 'quickstart' / 'predictions.pt'}" in out.stdout
    assert predictions.shape == (359,) and predictions.dtype == torch.long and 0 <= predictions.min() <= 9
    with (run / "predictions.csv").open(newline="") as f:  # the same classes, with their probabilities and the truth
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", *(f"p_{k}" for k in range(10)), "predicted", "true"]
    assert [int(r["predicted"]) for r in rows] == predictions.tolist()
    assert all(abs(sum(float(r[f"p_{k}"]) for k in range(10)) - 1) < 1e-4 for r in rows)
    # the hidden size came from the checkpoint, not from the config (64), or the weights would not have loaded
    assert "hidden_size: 8" in (run / "version_2" / "config.yaml").read_text()


@needs_data("ptb")
def test_ptb_char_fit_writes_a_checkpoint_and_test_reports_bpc(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "configs/ptb_char/bn_lstm.yaml"), f"--data.data_dir={DATA / 'ptb'}"]
    small = ["--model.hidden_size=16", "--data.batch_size=4", "--data.bptt=10", "--trainer.limit_val_batches=2"]
    _run(tmp_path, "fit", *args, *small, "--trainer.max_steps=3", "--trainer.val_check_interval=3", *SMALL)
    last = tmp_path / "runs" / "ptb_char" / "bn_lstm" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["hyper_parameters"]["dims"]["max_steps"] == 10
    assert len(checkpoint["vocab"]) == checkpoint["hyper_parameters"]["dims"]["vocab_size"] == 50
    out = _run(tmp_path, "test", *args, *small, f"--ckpt_path={last}", "--trainer.limit_test_batches=2", *SMALL)
    assert "test/bpc" in out.stdout and "test/ppl" in out.stdout
    _run(tmp_path, "predict", *args, *small, f"--ckpt_path={last}", "--trainer.limit_predict_batches=2", *SMALL)
    samples = (last.parents[1] / "samples.txt").read_text()  # three texts in PTB's characters
    assert samples.count("# sample ") == 3 and torch.load(last.parents[1] / "predictions.pt").shape == (8, 10)


def test_print_config_shows_composed_configs_and_the_linked_sizes_are_not_options(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        "fit",
        "--config",
        str(ROOT / "configs/smnist/bn_lstm.yaml"),
        "--config",
        str(ROOT / "configs/logger/csv.yaml"),
        "--trainer.max_epochs=7",
        "--print_config",
    )
    config = yaml.safe_load(out.stdout)
    assert config["model"]["init_args"]["variant"] == "bn_lstm"
    assert config["optimizer"]["class_path"] == "torch.optim.RMSprop"
    assert config["trainer"]["max_epochs"] == 7 and config["trainer"]["gradient_clip_val"] == 1.0
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert "dims" not in config["model"]["init_args"]  # a link target: set by the data, not by configs


@needs_data("digits")
def test_the_model_class_decides_what_the_checkpoint_monitors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = ["--trainer.default_root_dir", str(tmp_path), "--data.data_dir", str(DATA / "digits")]
    cli = ZooCLI(args=["--config", str(ROOT / "configs/quickstart.yaml"), *args], run=False)
    assert (cli.trainer.checkpoint_callback.monitor, cli.trainer.checkpoint_callback.mode) == ("val/acc", "max")
    best = cli.trainer.checkpoint_callback
    latest = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c is not best]
    # last.ckpt is the latest state at every save (its own callback), not only when a new best is saved
    assert best.save_last is False and len(latest) == 1
    assert (latest[0].monitor, latest[0].filename, latest[0].dirpath) == (None, "last", best.dirpath)
    cli = ZooCLI(
        args=["--config", str(ROOT / "configs/quickstart.yaml"), *args, "--checkpoint.monitor=val/loss"], run=False
    )
    assert (cli.trainer.checkpoint_callback.monitor, cli.trainer.checkpoint_callback.mode) == ("val/loss", "min")


@needs_data("digits")
def test_save_weights_only_applies_to_the_last_checkpoint_too(tmp_path: Path) -> None:
    _run(
        tmp_path,
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        f"--data.data_dir={DATA / 'digits'}",
        "--model.hidden_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--checkpoint.save_weights_only=true",
        *SMALL,
    )
    checkpoints = sorted((tmp_path / "runs" / "quickstart" / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints][-1] == "last.ckpt" and len(checkpoints) == 2
    for path in checkpoints:
        assert "optimizer_states" not in torch.load(path, weights_only=True), path.name


@needs_data("digits")
@pytest.mark.parametrize(("limit", "batches"), [("1", 1), ("2", 2), ("1.0", 6), ("0.5", 3)])
def test_an_integer_limit_is_a_number_of_batches_a_float_a_fraction(tmp_path: Path, limit: str, batches: int) -> None:
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), f"--data.data_dir={DATA / 'digits'}"]
    args += ["--model.hidden_size=4", f"--trainer.default_root_dir={tmp_path}", *SMALL]
    cli = main(["test", *args, f"--trainer.limit_test_batches={limit}"])
    assert cli.trainer.num_test_batches == [batches]  # 359 test images in batches of 64: 6 batches
    number = int if "." not in limit else float
    options = ["limit_train_batches", "limit_val_batches", "limit_predict_batches", "overfit_batches"]
    cli = ZooCLI(args=[*args, *(f"--trainer.{o}={limit}" for o in [*options, "val_check_interval"])], run=False)
    for option in options:
        assert getattr(cli.trainer, option) == number(limit) and type(getattr(cli.trainer, option)) is number, option
    assert type(cli.config.trainer.val_check_interval) is number


@needs_data("digits")
def test_a_fit_that_ends_before_any_validation_still_leaves_last_ckpt(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), f"--data.data_dir={DATA / 'digits'}"]
    args += ["--model.hidden_size=4", f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false", *SMALL]
    main(["fit", *args, "--trainer.max_steps=3", "--trainer.val_check_interval=0.5"])  # validation at step 10
    last = torch.load(tmp_path / "quickstart" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3


@needs_data("digits")
def test_model_options_that_contradict_the_checkpoint_are_refused(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), f"--data.data_dir={DATA / 'digits'}"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false", *SMALL]
    main(["fit", *args, "--model.hidden_size=16", "--trainer.max_steps=1"])
    ckpt = f"--ckpt_path={tmp_path / 'quickstart' / 'checkpoints' / 'last.ckpt'}"
    test = ["test", *args, ckpt, "--trainer.limit_test_batches=1"]
    with pytest.raises(ValueError) as refused:
        main([*test, "--model.variant", "rms_lstm", "--model.init_args.hidden_size=32", "--model.num_layers=2"])
    message = str(refused.value)
    assert "--model.hidden_size 32 (the checkpoint has 16), --model.variant 'rms_lstm' (the checkpoint has " in message
    assert "'ln_lstm')" in message and "num_layers" not in message and ckpt[len("--ckpt_path=") :] in message
    # options that agree with it, and config files (hidden_size: 128), are fine: the checkpoint's model is tested
    cli = main([*test, "--model.hidden_size=16", "--model.variant=ln_lstm"])
    assert cli.model.hparams.hidden_size == 16 and cli.model.variant == "ln_lstm"
