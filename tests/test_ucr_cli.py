"""The UCR/UEA configs train and test through ``train.py`` (zoo.cli) on a small made-up archive, one config each."""

from __future__ import annotations

from pathlib import Path

import pytest

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_archive(root: Path) -> None:
    """A 2-channel, 3-class, variable-length data set ``Toy`` with a missing value, in the archive's layout."""
    head = "@problemName Toy\n@timeStamps false\n@missing true\n@univariate false\n@dimensions 2\n"
    head += "@equalLength false\n@classLabel true x y z\n@data\n"
    for split, n in (("TRAIN", 15), ("TEST", 6)):
        lines = []
        for i in range(n):
            length = 5 + i % 4
            a = ",".join(str((i % 3) * 0.5 + t * 0.1) for t in range(length))
            b = ",".join("?" if t == 1 else str(-t * (i % 3)) for t in range(length))
            lines.append(f"{a}:{b}:{'xyz'[i % 3]}")
        path = root / "Toy" / f"Toy_{split}.ts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + "\n".join(lines) + "\n")


@pytest.mark.parametrize("variant", ["lstm", "bn_lstm", "ln_lstm", "seqbn_lstm"])
def test_ucr_config_fits_and_tests(tmp_path: Path, variant: str, capsys: pytest.CaptureFixture) -> None:
    write_archive(tmp_path / "archive")
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "ucr" / f"{variant}.yaml"),
            "--data.data_dir",
            str(tmp_path / "archive"),
            "--data.name",
            "Toy",
            "--model.init_args.hidden_size",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert cli.model.hparams.dims == {"input_size": 2, "num_classes": 3, "max_steps": 8}
    if variant == "bn_lstm":
        assert cli.model.rnn.options["max_steps"] == 8
    out = capsys.readouterr().out
    assert "test accuracy:" in out
    assert 0.0 <= cli.trainer.callback_metrics["test/acc"] <= 1.0
    assert list((tmp_path / "runs").glob("*/checkpoints/*.ckpt"))
