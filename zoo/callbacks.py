"""Callbacks of the zoo's training framework."""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader


def get_rng_state() -> dict[str, Any]:
    """The global random states (python, numpy, torch CPU and CUDA) as plain types and tensors (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global random states saved by `get_rng_state`."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _ResumableLoader:
    """Wraps a training DataLoader so that Lightning saves and restores its position (Lightning's `_Stateful` protocol).

    Its state is the random state at the start of the current epoch (which fixed the epoch's shuffling), the
    number of batches training has consumed (0 once the epoch is complete) and the number of processes its sampler
    splits the data over. On resume, the next ``iter()`` replays the epoch's shuffling from the saved random state,
    skips the consumed batches and puts the global random state back as it found it. Resumed on a different number of
    processes, it skips as many batches as keep the epoch's number of samples right (the order differs: not exact).
    """

    def __init__(self, loader: Any, trainer: L.Trainer) -> None:
        self.loader = loader
        self.trainer = trainer
        self._epoch_rng: dict[str, Any] | None = None
        self._resume: tuple[dict[str, Any], int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        skip, outer = 0, None
        if self._resume is not None:
            (epoch_rng, skip), self._resume = self._resume, None
            outer = get_rng_state()
            set_rng_state(epoch_rng)
        self._epoch_rng = get_rng_state()
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
        if outer is not None:
            set_rng_state(outer)
        yield from it

    def _replicas(self) -> int:
        return int(getattr(getattr(self.loader, "sampler", None), "num_replicas", 1))

    def state_dict(self) -> dict[str, Any]:
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch_rng": self._epoch_rng,
            "batches": 0 if batches >= self.trainer.num_training_batches else batches,
            "replicas": self._replicas(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = state["batches"] * state.get("replicas", 1) // self._replicas()
        if state.get("epoch_rng") is not None and 0 < batches < len(self.loader):
            self._resume = (state["epoch_rng"], batches)


class ExactResume(L.Callback):
    """Make ``fit(ckpt_path=...)`` continue exactly where the checkpoint was taken, even in the middle of an epoch.

    Lightning restores the weights, optimizer, schedulers and loop counters; this adds the global random states
    (python, numpy, torch) at the time of the checkpoint and the position in the training data: the training
    DataLoader is wrapped so that the epoch's shuffling is replayed and the batches already seen are skipped. Models
    that carry state between batches (`zoo.models.LanguageModel`) save it themselves. Everything is saved as plain
    types and tensors, so checkpoints load with ``torch.load(path, weights_only=True)``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        make = owner.train_dataloader
        if getattr(make, "_zoo_resumable", False):
            return

        def train_dataloader() -> _ResumableLoader:
            loader = make()
            if isinstance(loader, DataLoader):  # the distributed sampler first: Lightning leaves the wrapper alone
                loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
            return _ResumableLoader(loader, trainer)

        train_dataloader._zoo_resumable = True  # type: ignore[attr-defined]
        owner.train_dataloader = train_dataloader

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict["rng"])


class LastCheckpoint(ModelCheckpoint):
    """Keep ``<dirpath>/last.ckpt``, the latest state of a fit: at every save of the run's schedule, when training ends
    for any reason (``max_steps``, ``max_epochs``, ``max_time``, early stopping) and when it is stopped by SIGTERM,
    SIGINT (Ctrl-C) or an error.

    SIGTERM (``kill``, ``docker stop``, Kubernetes) and SIGINT let the current training step finish (Lightning's signal
    connector; SIGINT is routed to it during fit), then last.ckpt is saved where resuming with ``--ckpt_path last`` is
    exact, a message says where it is, and the process exits with status 128 + the signal's number. A second Ctrl-C
    stops at once without saving (the interrupted step may be half done).
    """

    def __init__(self, dirpath: str, **kwargs: Any) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            enable_version_counter=False,
            **kwargs,
        )
        self._signum: int | None = None
        self._sigint_handler: Callable[[int, FrameType | None], Any] | int | None = None

    @property
    def path(self) -> Path:
        """The path of ``last.ckpt``."""
        return Path(self.dirpath or ".", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._signum = None
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._sigint_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """A first Ctrl-C stops like SIGTERM, after the current step (Lightning's SIGTERM handler raises the flag the
        loops check); a second one, or one before Lightning's handler is in place, raises KeyboardInterrupt."""
        handler = signal.getsignal(signal.SIGTERM)
        if self._signum is not None or not callable(handler):
            raise KeyboardInterrupt
        self._signum = signum
        handler(signum, frame)

    def _save_unless_saved(self, trainer: L.Trainer) -> None:
        """Save last.ckpt unless it already holds this step (or this is a sanity check or a fast_dev_run)."""
        if not (trainer.fast_dev_run or trainer.sanity_checking or self._last_global_step_saved == trainer.global_step):
            self._save_checkpoint(trainer, str(self.path))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_unless_saved(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return  # raised anywhere, in the middle of a step too: the state may be half updated
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._save_unless_saved(trainer)
        if isinstance(exception, SIGTERMException):
            signum = self._signum or signal.SIGTERM
            exception.code = 128 + signum
            if trainer.is_global_zero:
                saved = (
                    f"the latest state (step {trainer.global_step}) is in {self.path}; resume with the same command "
                    "and --ckpt_path last"
                    if fitting and self.path.is_file()
                    else "nothing saved"
                )
                print(f"Stopped by {signal.Signals(signum).name}: {saved}", file=sys.stderr, flush=True)


class TrainClock(L.Callback):
    """Log the wall-clock seconds spent training so far as ``time/train_s`` with every validation.

    Validation (and the sanity check) is left out of the clock, so the figure is the cost of the training steps
    alone; it is saved in checkpoints, so a resumed fit continues the count. For curves of a validation metric against
    training time (`zoo.study`).
    """

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._since: float | None = None

    def _start(self) -> None:
        self._since = time.perf_counter()

    def _stop(self) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("time/train_s", self.elapsed, sync_dist=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._start()

    def state_dict(self) -> dict[str, Any]:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return {"elapsed": self.elapsed + running}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed = float(state_dict["elapsed"])
