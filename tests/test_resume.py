"""Killing a run with SIGKILL and resuming it from its last checkpoint ends with the same weights as a run that was
never interrupted (CPU, deterministic), for a shuffled classification task and a stateful language model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from needs_data import DATA, require_data
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]


class SigkillAt(L.Callback):
    """Kill the process (SIGKILL: no clean-up, no checkpoint) when training is about to run step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TinyText(L.LightningDataModule):
    """A small token stream cut into ``streams`` contiguous rows and windows of ``bptt`` (the LM batch contract)."""

    def __init__(self, vocab_size: int = 7, streams: int = 3, bptt: int = 5, length: int = 200) -> None:
        super().__init__()
        self.vocab_size, self.streams, self.bptt, self.length = vocab_size, streams, bptt, length
        self.vocab = [chr(ord("a") + i) for i in range(vocab_size)]

    @property
    def dims(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "max_steps": self.bptt}

    def _loader(self, seed: int) -> DataLoader:
        tokens = torch.randint(self.vocab_size, (self.length,), generator=torch.Generator().manual_seed(seed))
        rows = tokens[: self.length // self.streams * self.streams].view(self.streams, -1)
        windows = [
            (rows[:, i : i + self.bptt], rows[:, i + 1 : i + 1 + self.bptt])
            for i in range(0, rows.shape[1] - 1, self.bptt)
        ]
        return DataLoader(windows, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


COMMON = [  # a deterministic fit of 30 steps that saves last.ckpt every 5
    "--seed_everything=3",
    "--trainer.max_steps=30",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=2",
    "--trainer.deterministic=true",
    "--trainer.gradient_clip_val=1.0",
    "--checkpoint.every_n_train_steps=5",
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "disabled"}


def _fit(tmp: Path, config: str, extra: list[str], env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", config, *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 30
    return state["state_dict"]


CLASSIFIER = """
model:
  class_path: zoo.models.SequenceClassifier
  init_args: {variant: bn_lstm, hidden_size: 8, num_layers: 2, dropout: 0.5, rnn_options: {init_noise: 0.1}}
data:
  class_path: zoo.data.SequentialDigits
  init_args: {data_dir: DATA_DIR, batch_size: 64}
optimizer:
  class_path: torch.optim.RMSprop
  init_args: {lr: 0.001, momentum: 0.9}
"""

LANGUAGE_MODEL = """
model:
  class_path: zoo.models.LanguageModel
  init_args: {variant: ln_lstm, hidden_size: 8, num_layers: 2, dropout: 0.3, embedding_dim: 4}
data:
  class_path: test_resume.TinyText
lr_scheduler:
  class_path: torch.optim.lr_scheduler.StepLR
  init_args: {step_size: 4, gamma: 0.5}
"""


@pytest.mark.parametrize("task", ["classifier", "language_model"])
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path: Path, task: str) -> None:
    if task == "classifier":
        require_data("digits")
        config = CLASSIFIER.replace("DATA_DIR", str(DATA / "digits"))  # 20 shuffled batches an epoch
    else:
        config = LANGUAGE_MODEL  # 14 windows an epoch; the hidden state is carried from one to the next
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "kill.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: test_resume.SigkillAt\n      init_args: {step: 25}\n"
    )

    full = _fit(tmp_path, "config.yaml", [*COMMON, "--name=full"], ENV)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _fit(tmp_path, "config.yaml", [*COMMON, "--name=killed", "--config=kill.yaml"], ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 25

    resumed = _fit(tmp_path, "config.yaml", [*COMMON, "--name=killed", "--ckpt_path=last"], ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stderr + resumed.stdout

    expected = _weights(tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt")
    got = _weights(last)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
