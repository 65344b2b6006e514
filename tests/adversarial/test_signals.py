"""Adversarial stops: SIGTERM, SIGINT (Ctrl-C) or SIGKILL at seeded random points of a tiny fit run as a subprocess
(a random step and a random place in it: before the batch, between backward and the optimizer step, after the batch,
in validation, at the end of an epoch). Resuming with ``--ckpt_path last`` must end with exactly the weights of a fit
that was never stopped, and SIGTERM / SIGINT must stop with their exit status and say where the checkpoint is."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_resume import COMMON, LANGUAGE_MODEL, _fit, _weights

HOOKS = [
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_train_epoch_end",
]
DRAWS = {signal.SIGTERM: 1, signal.SIGINT: 1, signal.SIGKILL: 1}  # one point each; test_resume.py: one more SIGKILL


def _cases(seed: int = 1) -> list[tuple[str, int, str]]:
    """(signal, step, hook) draws, ``DRAWS`` of each signal, in different hooks; steps 1-26 of the 30, so a stop is
    always early."""
    rng = random.Random(seed)
    return [(s.name, rng.randint(1, 26), hook) for s, n in DRAWS.items() for hook in rng.sample(HOOKS, n)]


class SignalAt(L.Callback):
    """Send the signal ``name`` to this process once, in ``hook``, the first time that hook runs at step ``step`` or
    later."""

    def __init__(self, name: str, step: int, hook: str) -> None:
        self.signum, self.step, self.sent = signal.Signals[name], step, False
        setattr(self, hook, self._maybe_send)

    def _maybe_send(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            signal.raise_signal(self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights after the 30 steps of a fit that nothing stops."""
    tmp = tmp_path_factory.mktemp("full")
    (tmp / "config.yaml").write_text(LANGUAGE_MODEL)
    full = _fit(tmp, "config.yaml", [*COMMON, "--name=full"])
    assert full.returncode == 0, full.stderr[-3000:]
    return _weights(tmp / "runs" / "full" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(("name", "step", "hook"), _cases())
def test_a_signal_anywhere_then_resume_gives_the_uninterrupted_weights(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor], name: str, step: int, hook: str
) -> None:
    (tmp_path / "config.yaml").write_text(LANGUAGE_MODEL)
    (tmp_path / "signal.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: adversarial.test_signals.SignalAt\n"
        f"      init_args: {{name: {name}, step: {step}, hook: {hook}}}\n"
    )
    stopped = _fit(tmp_path, "config.yaml", [*COMMON, "--name=run", "--config=signal.yaml"])
    signum = getattr(signal, name)
    last = tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt"
    if signum == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
    else:
        assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
        assert f"Stopped by {name}: the latest state (step " in stopped.stderr
        assert f"is in {last}; resume with" in stopped.stderr
        assert "--ckpt_path last" in stopped.stderr
        assert step <= torch.load(last, weights_only=True)["global_step"] < 30  # saved where it stopped, early

    resumed = _fit(tmp_path, "config.yaml", [*COMMON, "--name=run", "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _weights(last)
    assert got.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(value, got[key]), key
