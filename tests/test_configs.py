"""Every config under configs/ parses and builds its model and data through the CLI, with the sizes linked from the
data; the paper configs hold the papers' settings; the shared per-task files are all used; logger files compose."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from needs_data import require_data

from zoo.cli import ZooCLI
from zoo.data import PennTreebank
from zoo.models import RecurrentModule

ROOT = Path(__file__).resolve().parents[1]
STUDY = (
    ROOT / "configs" / "study"
)  # the study's plan (tests/test_study.py) and its task configs (variant from the plan)
ZOO = ROOT / "configs" / "zoo"  # the converged zoo's plan and task configs (variant from the plan)
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if not p.name.startswith("_") and p.parent.name != "logger" and p.name != "plan.yaml"
)


def _data_config(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()).get("data") or {}
    if isinstance(data, str):  # a per-task file, relative to the config's folder
        data = yaml.safe_load((path.parent / data).read_text())
    return data


def _args(path: Path, tmp_path: Path) -> list[str]:
    """The config with its outputs in tmp_path; skips (missing data) unless the data root holds the config's data."""
    init_args = _data_config(path).get("init_args", {})
    data = init_args.get("data_dir") or init_args.get("path")
    assert data and not Path(data).is_absolute() and not data.startswith("."), f"{path}: data path {data!r}"
    name = init_args.get("name")  # (one data set of an archive: UCR/UEA)
    require_data(f"{data}/{name}" if name else data)  # a config names its data relative to the data root
    return ["--config", str(path), "--trainer.default_root_dir", str(tmp_path)]


_PTB_LOAD = PennTreebank.load
_PTB_CACHE: dict[tuple[str, str], tuple] = {}


def _ptb_load_once(self: PennTreebank) -> tuple:
    key = (str(self.data_dir), self.hparams.level)
    if key not in _PTB_CACHE:
        _PTB_CACHE[key] = _PTB_LOAD(self)
    return _PTB_CACHE[key]


@pytest.fixture(autouse=True)
def _read_ptb_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read each PTB level once for the whole module (the twenty PTB configs share two corpora); hide pytest's own
    command line from the CLI, which parses ``args``."""
    monkeypatch.setattr(PennTreebank, "load", _ptb_load_once)
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_builds_model_and_data(path: Path, tmp_path: Path) -> None:
    cli = ZooCLI(args=_args(path, tmp_path), run=False)
    assert isinstance(cli.model, RecurrentModule)
    assert cli.model.hparams.dims == cli.datamodule.dims  # linked from the data, never repeated in the config
    if path.parent.name != "configs" and path.parent not in (STUDY, ZOO):
        assert cli.model.hparams.variant == path.stem
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    checkpoint = cli.trainer.checkpoint_callback
    model = type(cli.model)
    chosen = yaml.safe_load(path.read_text()).get("checkpoint") or {}  # a config may choose the monitor
    expected = (chosen["monitor"], chosen["mode"]) if chosen else (model.monitor, model.monitor_mode)
    assert (checkpoint.monitor, checkpoint.mode) == expected
    assert Path(checkpoint.dirpath).is_relative_to(tmp_path)


def test_every_shared_task_file_is_used() -> None:
    used = set()
    for path in CONFIGS:
        for value in yaml.safe_load(path.read_text()).values():
            if isinstance(value, str) and value.endswith(".yaml"):
                used.add((path.parent / value).resolve())
    shared = {p.resolve() for p in (ROOT / "configs").rglob("_*.yaml")}
    assert shared <= used, sorted(str(p) for p in shared - used)


def test_ptb_char_bn_lstm_has_the_paper_settings(tmp_path: Path) -> None:
    """Cooijmans et al. 2016, sec. 5.2: 1000 units, windows of 100, batch 64, Adam 2e-3, clipping at 1.0, gamma 0.1."""
    cli = ZooCLI(args=_args(ROOT / "configs/ptb_char/bn_lstm.yaml", tmp_path), run=False)
    cell = cli.model.rnn.cells[0]
    assert cli.model.hparams.hidden_size == 1000 and cli.model.hparams.embedding_dim is None
    assert (cli.datamodule.batch_size, cli.datamodule.bptt, cli.datamodule.hparams.level) == (64, 100, "char")
    assert cell.bn_hh.max_steps == 100 and torch.allclose(cell.bn_hh.weight, torch.tensor(0.1))
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 2e-3
    assert cli.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("task", ["smnist", "pmnist"])
def test_mnist_bn_lstm_has_the_paper_settings(task: str, tmp_path: Path) -> None:
    """Cooijmans et al. 2016, sec. 5.1: 100 units, RMSProp 1e-3 momentum 0.9, batch 100, clipping at 1.0, noise 0.1."""
    cli = ZooCLI(args=_args(ROOT / f"configs/{task}/bn_lstm.yaml", tmp_path), run=False)
    cell = cli.model.rnn.cells[0]
    assert cli.model.hparams.hidden_size == 100 and cell.init_noise == 0.1 and cell.bn_hh.max_steps == 784
    assert cli.datamodule.batch_size == 100 and cli.datamodule.hparams.permuted == (task == "pmnist")
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer) is torch.optim.RMSprop
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"]) == (1e-3, 0.9)
    assert cli.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize(("logger", "cls"), [("wandb", WandbLogger), ("csv", CSVLogger)])
def test_logger_configs_compose_with_a_task_config(
    logger: str, cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [*_args(ROOT / "configs/quickstart.yaml", tmp_path), "--config", str(ROOT / f"configs/logger/{logger}.yaml")]
    cli = ZooCLI(args=args, run=False)
    assert isinstance(cli.trainer.logger, cls)
    assert (
        cli.model.hparams.variant
        == yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())["model"]["init_args"]["variant"]
    )


def test_the_converged_zoos_runs_stop_after_45_minutes(tmp_path: Path) -> None:
    """configs/zoo/*.yaml cap each run with their Timer: the trainer holds that one Timer, with 45 minutes."""
    cli = ZooCLI(args=_args(ROOT / "configs/zoo/ucr.yaml", tmp_path), run=False)
    (timer,) = [c for c in cli.trainer.callbacks if isinstance(c, Timer)]
    assert timer.time_remaining() == 45 * 60  # nothing elapsed yet
