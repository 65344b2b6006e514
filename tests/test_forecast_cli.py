"""The ETT configs train and test through ``train.py`` (zoo.cli) on any CSV of ETTh1's shape, by config only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def write_csv(path: Path, rows: int) -> None:
    """An hourly CSV with ETTh1's columns: sines of different periods."""
    lines = ["date," + ",".join(COLUMNS)]
    for i in range(rows):
        values = ",".join(f"{math.sin(2 * math.pi * i / (6 + 3 * k)) * k + 10 * k:.4f}" for k in range(1, 8))
        lines.append(f"2021-03-{1 + i // 24:02d} {i % 24:02d}:00:00,{values}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("variant", ["lstm", "ln_lstm", "bn_lstm"])
def test_ett_config_fits_and_tests_on_a_synthetic_csv(
    tmp_path: Path, variant: str, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "synthetic.csv"
    write_csv(csv, 24 * 5)
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "ett" / f"{variant}.yaml"),
            "--data.path",
            str(csv),
            "--data.split",
            "[3D, 1D, 1D]",
            "--data.input_len",
            "12",
            "--data.horizon",
            "6",
            "--model.init_args.hidden_size",
            "8",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert cli.model.hparams.dims == {"input_size": 7, "output_size": 1, "horizon": 6, "max_steps": 12}
    assert cli.model.target_index.tolist() == [6]
    out = capsys.readouterr().out
    for name in ("test mse:", "test mae:", "test mse_raw:", "test mae_raw:"):
        assert name in out
    metrics = cli.trainer.callback_metrics
    std = float(cli.datamodule.target_std[0])
    assert float(metrics["test/mse_raw"]) == pytest.approx(float(metrics["test/mse"]) * std**2, rel=1e-4)
    assert float(metrics["test/mae_raw"]) == pytest.approx(float(metrics["test/mae"]) * std, rel=1e-4)


@pytest.mark.parametrize("variant", ["lstm", "ln_lstm", "bn_lstm"])
def test_ett_config_runs_shorter_than_one_epoch(tmp_path: Path, variant: str, capsys: pytest.CaptureFixture) -> None:
    """--trainer.max_steps below one epoch ends fit before any validation; early stopping must not ask for val/mse."""
    csv = tmp_path / "synthetic.csv"
    write_csv(csv, 24 * 5)
    config = ROOT / "configs" / "ett" / f"{variant}.yaml"
    args = ["--data.path", str(csv), "--data.split", "[3D, 1D, 1D]", "--data.input_len", "12", "--data.horizon", "6"]
    args += ["--data.batch_size", "8", "--model.init_args.hidden_size", "8", "--trainer.max_steps", "2"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]
    cli = main(["fit", "--config", str(config), *args])
    assert len(cli.datamodule.train_dataloader()) == 7  # 55 windows in batches of 8: the run stops inside epoch 0
    assert cli.trainer.global_step == 2
    out = capsys.readouterr().out
    assert "checkpoint: (none saved; tested the final weights)" in out and "test mse:" in out
