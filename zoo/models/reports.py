"""What a task leaves in its run directory at the end of ``test``: plots (PNG), tables (CSV) and text.

Each file is also logged to the run's W&B logger (``log_image`` / ``log_table`` / ``log_text``) or TensorBoard logger
(``add_image`` / ``add_text``); with neither, its path is printed. Only the global-zero process writes, and only
when the trainer has a logger (see `run_dir`). Figures are drawn on matplotlib's Agg canvas, so no display is needed
and pyplot's global state is left alone.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run's directory: the first CSV or TensorBoard logger's ``log_dir``; with another logger (W&B), the folder
    that holds the checkpoints folder (``<trainer.default_root_dir>/<name>`` under `zoo.cli`) or else
    ``default_root_dir``; None without a logger (nothing is written then)."""
    if not trainer.loggers:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger | TensorBoardLogger):
            return Path(logger.log_dir)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath:
        return Path(checkpoint.dirpath).parent
    return Path(trainer.default_root_dir)


def _target(trainer: L.Trainer, filename: str) -> Path | None:
    directory = run_dir(trainer) if trainer.is_global_zero else None
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return directory / filename


def _logged(trainer: L.Trainer) -> list[WandbLogger | TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]


def _announce(trainer: L.Trainer, key: str, path: Path) -> None:
    if not _logged(trainer):
        print(f"{key}: {path}")


def publish_figure(trainer: L.Trainer, key: str, fig: Figure, filename: str) -> Path | None:
    """Save ``fig`` as ``<run dir>/<filename>`` (PNG) and log it as the image ``key``; the path, or None when the
    trainer has no run directory or this is not the global-zero process."""
    path = _target(trainer, filename)
    if path is None:
        return None
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    for logger in _logged(trainer):
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(path)])
        else:
            logger.experiment.add_image(key, imread(path)[..., :3], trainer.global_step, dataformats="HWC")
    _announce(trainer, key, path)
    return path


def publish_table(
    trainer: L.Trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[object]], filename: str
) -> Path | None:
    """Write ``rows`` under the header ``columns`` as ``<run dir>/<filename>`` (CSV) and log them as the table
    ``key`` (TensorBoard: a Markdown table); the path, or None as for `publish_figure`."""
    path = _target(trainer, filename)
    if path is None:
        return None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    for logger in _logged(trainer):
        if isinstance(logger, WandbLogger):
            logger.log_table(key, columns=list(columns), data=[list(r) for r in rows])
        else:
            lines = [columns, ["---"] * len(columns), *rows]
            logger.experiment.add_text(key, "\n".join("| " + " | ".join(map(str, r)) + " |" for r in lines))
    _announce(trainer, key, path)
    return path


def publish_text(trainer: L.Trainer, key: str, text: str, filename: str) -> Path | None:
    """Write ``text`` to ``<run dir>/<filename>`` (UTF-8) and log it as the text ``key``; the path, or None as for
    `publish_figure`."""
    path = _target(trainer, filename)
    if path is None:
        return None
    path.write_text(text, encoding="utf-8")
    for logger in _logged(trainer):
        if isinstance(logger, WandbLogger):
            logger.log_text(key, columns=["text"], data=[[text]])
        else:
            logger.experiment.add_text(key, "    " + text.replace("\n", "\n    "), trainer.global_step)
    _announce(trainer, key, path)
    return path


def forecast_figure(
    history: np.ndarray, truth: np.ndarray, forecast: np.ndarray, target: str, titles: Sequence[str]
) -> Figure:
    """One panel per window, titled by ``titles``: the target's ``history`` (n, window), then ``truth`` and
    ``forecast`` (n, horizon)."""
    n, window = history.shape
    horizon = truth.shape[1]
    fig = Figure(figsize=(10, 2.2 * n + 0.6), layout="constrained")
    past, ahead = np.arange(1 - window, 1), np.arange(1, horizon + 1)
    axes = fig.subplots(n, 1, squeeze=False, sharex=True)[:, 0]
    for i, ax in enumerate(axes):
        ax.plot(past, history[i], color="0.35", lw=1.2, label="history (input window)")
        ax.plot(ahead, truth[i], color="tab:blue", lw=1.6, label="truth")
        ax.plot(ahead, forecast[i], color="tab:orange", lw=1.6, ls="--", label="forecast")
        ax.axvline(0.5, color="0.6", lw=0.8, ls=":")
        ax.set_ylabel(f"{target} (normalized)")
        ax.set_title(titles[i], fontsize="medium", loc="right")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small", ncols=3)
    axes[-1].set_xlabel("step relative to the last input row (0)")
    fig.suptitle(f"Test windows: {window} steps in, {horizon} forecast")
    return fig


def confusion_figure(matrix: np.ndarray, labels: Sequence[str]) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted class) with its counts, shaded by row share."""
    k = len(labels)
    side = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    if k <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize="small", color=color)
    ax.set_xticks(range(k), labels, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} test samples)")
    return fig
