"""configs/logger/wandb.yaml with WANDB_MODE=offline: the run directory under $WANDB_DIR holds the resolved config
(as a file and as the run's config), the metrics (read back from the run's .wandb log with wandb's own protobufs) and
the end-of-test report's image and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from needs_data import DATA, needs_data

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

ROOT = Path(__file__).resolve().parents[1]


def read_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header, then LevelDB-style log blocks of 32 KiB whose chunks (4-byte
    checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) carry serialized `Record` protobufs."""
    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@needs_data("digits")
def test_offline_wandb_run_holds_the_config_and_the_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--config",
        str(ROOT / "configs/logger/wandb.yaml"),
        f"--data.data_dir={DATA / 'digits'}",
        "--model.hidden_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    config = yaml.safe_load((run / "files" / "config.yaml").read_text())
    assert config["model"]["init_args"]["variant"] == "ln_lstm" and config["model"]["init_args"]["hidden_size"] == 8
    assert config["optimizer"]["class_path"] == "torch.optim.Adam" and isinstance(config["seed_everything"], int)
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"

    (log,) = run.glob("run-*.wandb")
    records = read_records(log)
    logged_config = {}
    history: dict[str, list] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            logged_config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    assert logged_config["config"]["model"] == config["model"]  # the full resolved config is the run's config
    assert logged_config["variant"] == "ln_lstm"  # and the model's hyperparameters
    assert len(history["train/loss_step"]) == 3 and len(history["val/acc"]) == 1 and len(history["test/acc"]) == 1
    assert 0.0 <= history["val/acc"][0] <= 1.0
    assert history["lr-Adam"][0] == pytest.approx(config["optimizer"]["init_args"]["lr"])

    # the end-of-test report (zoo.models.reports): the confusion matrix as an image, per-class accuracy as a table,
    # the same files as in the run directory (runs/<name>, beside the checkpoints)
    (image,) = history["test/confusion_matrix/filenames"][0]
    report = tmp_path / "runs" / "quickstart"
    assert (run / "files" / image).read_bytes() == (report / "confusion_matrix.png").read_bytes()
    table = json.loads((run / "files" / history["test/per_class_accuracy/path"][0]).read_text())
    assert table["columns"] == ["class", "samples", "correct", "accuracy"] and len(table["data"]) == 10
    samples, correct = (sum(int(row[i]) for row in table["data"]) for i in (1, 2))
    assert samples == 2 * 64  # limit_test_batches=2 of batch_size 64
    assert correct / samples == pytest.approx(history["test/acc"][0], abs=1e-6)
