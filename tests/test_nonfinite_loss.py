"""A non-finite training loss stops the fit with a message naming the step, before the step's update and with the
batch-norm running statistics as they were before it: the saved last.ckpt equals the state of a clean run stopped
after the same number of steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zoo.cli import main
from zoo.models import LanguageModel


class NaNAt(L.LightningDataModule):
    """Random (x, lengths, y) classification batches of 4 sequences of 5 steps; batch ``nan_batch`` (if not None) has
    one NaN in its inputs."""

    def __init__(self, nan_batch: int | None = None) -> None:
        super().__init__()
        self.nan_batch = nan_batch

    @property
    def dims(self) -> dict[str, int]:
        return {"input_size": 2, "num_classes": 3, "max_steps": 5}

    def _loader(self, seed: int, nan_batch: int | None) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 4, 5, 2, generator=g), torch.randint(3, (8, 4), generator=g)
        if nan_batch is not None:
            x[nan_batch, 1, 2, 0] = float("nan")
        return DataLoader([(x[i], torch.full((4,), 5), y[i]) for i in range(8)], batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, self.nan_batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1, None)


def _fit(root: Path, *args: str) -> None:
    main(
        [
            "fit",
            "--model=zoo.models.SequenceClassifier",
            "--model.variant=bn_lstm",
            "--model.hidden_size=4",
            "--data=test_nonfinite_loss.NaNAt",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.max_epochs=1",
            "--seed_everything=0",
            "--name=run",
            *args,
        ]
    )


@pytest.mark.parametrize("variant", ["bn_lstm", "seqbn_lstm"])
def test_a_nan_loss_stops_before_it_poisons_the_running_statistics(tmp_path: Path, variant: str) -> None:
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 3 \(epoch 0, batch 3\)"):
        _fit(tmp_path / "nan", "--data.nan_batch=3", f"--model.variant={variant}")
    stopped = torch.load(tmp_path / "nan/run/checkpoints/last.ckpt", weights_only=True)
    _fit(tmp_path / "clean", "--trainer.max_steps=3", f"--model.variant={variant}")
    clean = torch.load(tmp_path / "clean/run/checkpoints/last.ckpt", weights_only=True)
    assert stopped["global_step"] == clean["global_step"] == 3
    statistics = [k for k in clean["state_dict"] if "running" in k]
    assert statistics
    for name, value in clean["state_dict"].items():  # weights and running statistics, all finite
        assert torch.equal(stopped["state_dict"][name], value), name


def test_the_language_model_puts_back_its_carried_state_too() -> None:
    model = LanguageModel("bn_lstm", hidden_size=4, embedding_dim=3, dims={"vocab_size": 5, "max_steps": 6})
    batch = (torch.randint(5, (2, 6)), torch.randint(5, (2, 6)))
    model.on_train_batch_start(batch, 0)
    loss = model.training_step(batch, 0)
    before, stats = model._states["train"], model.rnn.cells[0].bn_ih.running_mean.clone()
    model.on_train_batch_start(batch, 1)
    model.training_step(batch, 1)
    assert not torch.equal(model.rnn.cells[0].bn_ih.running_mean, stats)
    with pytest.raises(FloatingPointError, match=r"training loss is inf at step 0 \(epoch 0, batch 1\)"):
        model.on_before_backward(loss * float("inf"))
    assert model._states["train"] is before
    assert torch.equal(model.rnn.cells[0].bn_ih.running_mean, stats)
    model.on_before_backward(loss)  # a finite loss passes
