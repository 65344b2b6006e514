"""The zoo's command line: one `LightningCLI` for every model / DataModule pair (``train.py fit --config ...``)."""

from __future__ import annotations

import importlib
import json
import operator
import os
import re
import sys
from functools import reduce
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

from zoo import hub
from zoo.callbacks import ExactResume, LastCheckpoint
from zoo.checkpoints import check_ckpt_path
from zoo.models.base import RecurrentModule

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
METRIC_NAMES = {"acc": "accuracy", "ppl": "perplexity"}
PRETRAINED = "pretrained:"


class ZooSaveConfig(SaveConfigCallback):
    """Save the resolved config (with the seed) as ``config.yaml`` in the log directory and, for a W&B run, log it
    as the run's config and save it among the run's files."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": yaml.safe_load(text)})
                Path(logger.experiment.dir, "config.yaml").write_text(text)


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


class ZooCLI(LightningCLI):
    """`LightningCLI` with the zoo's conventions.

    - ``model`` is any `zoo.models.RecurrentModule` and ``data`` any LightningDataModule (subclass mode), chosen in the
      config by ``class_path``; the sizes that the data determine link into the model (``data.dims`` ->
      ``model.init_args.dims``).
    - ``--name`` names the run (default: ``<datamodule>[_<data.name>]_<variant>``, the data set's name where the
      DataModule has one); checkpoints go to ``<trainer.default_root_dir>/<name>/checkpoints`` (default root
      ``runs``), so ``fit --ckpt_path last`` finds the run's last checkpoint, and the CSV logger writes
      ``<root>/<name>/version_<n>``.
    - ``checkpoint.*`` configures the ModelCheckpoint, which keeps the best checkpoint on the model's own validation
      metric (``monitor`` / ``monitor_mode`` of the model class: ``val/bpc`` min, ``val/acc`` max, ...) and the last.
    - `ExactResume` makes a resumed fit continue exactly; a LearningRateMonitor is added whenever there is a logger.
    - Every checkpoint is read weights-only (``--weights_only false`` is refused), a remote one too, and
      ``--ckpt_path`` is read before any work starts (`zoo.checkpoints`).
    - ``predict`` saves the model's outputs to ``<root>/<name>/predictions.pt`` (on the test split when the
      DataModule has no predict split), and the model's ``write_predictions`` (if it has one) writes its readable
      files beside it: ``predictions.csv`` of a forecaster or a classifier, ``samples.txt`` of a language model.
    - ``--test_after_fit true`` tests the best checkpoint when fit ends and prints its path and the test metrics.
    - The optimizer defaults to Adam (lr 1e-3); ``optimizer:`` / ``lr_scheduler:`` in a config choose others.
    - Published models (`zoo.hub`: a name, directory, URL or ``hf://owner/repo``): ``--init_from <model>`` starts from
      its weights (fit fine-tunes them; the model the config builds must have their shapes);
      ``--ckpt_path pretrained:<model>`` validates / tests / predicts with it, the model rebuilt from its published
      config (as from a checkpoint's hyperparameters); ``--pretrained <model>`` is short for that plus
      ``--config <its training config>`` (see `main`).
    """

    _published: hub.Published | None = None  # the model of --ckpt_path pretrained:<model>
    _model_flags: set[str] = set()  # the model options given on the command line (--model.<name>)

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", ZooSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            RecurrentModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _integers_first(parser)
        parser.link_arguments("data.dims", "model.init_args.dims", apply_on="instantiate")
        parser.add_argument(
            "--name", type=str | None, default=None, help="run name (default: <datamodule>[_<data.name>]_<variant>)"
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after fit, test the best checkpoint and print its path and the test metrics",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="start from the weights of a published model (zoo.hub name, directory, URL or hf://owner/repo)",
        )
        parser.add_argument(
            "--pretrained",
            type=str | None,
            default=None,
            help="validate/test/predict a published model with its own training config: short for "
            "--config <its training config> --ckpt_path pretrained:<model>",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "trainer.default_root_dir": "runs"})
        parser.add_optimizer_args((Optimizer,))
        parser.set_defaults({"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, and keep the ``--model.<name>`` options the command line gives."""
        argv = args if isinstance(args, list) else sys.argv[1:] if args is None else []
        self._model_flags = {
            arg[len("--model.") :].split("=")[0].removeprefix("init_args.").split(".")[0]
            for arg in argv
            if isinstance(arg, str) and arg.startswith("--model.")
        }
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._published = None
        ckpt_path = f"{PRETRAINED}{cfg.pretrained}" if cfg.get("pretrained") else cfg.get("ckpt_path")
        if isinstance(ckpt_path, str) and ckpt_path.startswith(PRETRAINED):
            if self.subcommand == "fit":
                raise ValueError(f"--ckpt_path {ckpt_path} is for validate/test/predict; fit starts from --init_from")
            self._published = hub.read_published(ckpt_path[len(PRETRAINED) :])
            model = self._published.config["model"]
            init_args = {k: v for k, v in model["init_args"].items() if k != "dims"}  # dims come from the data
            update = {"model": {"class_path": model["class_path"], "init_args": init_args}}
            update = {self.subcommand: update} if self.subcommand else update
            self.config = self.parser.parse_object(update, self.config)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
        model_cls = _class(cfg.model.class_path)
        variant = cfg.model.init_args.get("variant", "model")
        name = cfg.name
        if not name:
            data = cfg.get("data")
            data_name = data.init_args.get("name") if data else None  # e.g. the UCR data set
            parts = [_short(data.class_path).lower(), data_name, variant] if data else [variant]
            name = "_".join(str(p) for p in parts if p)
        name = re.sub(r"[^\w.\-/]", "_", name)
        cfg.name = name
        root = Path(cfg.trainer.default_root_dir or "runs")
        if cfg.checkpoint.monitor is None and issubclass(model_cls, RecurrentModule):
            cfg.checkpoint.monitor = model_cls.monitor
            cfg.checkpoint.mode = model_cls.monitor_mode
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(root / name / "checkpoints")
        if self.subcommand and cfg.get("ckpt_path") == "last":  # resuming reads the run's last.ckpt
            check_ckpt_path("last", last=Path(cfg.checkpoint.dirpath) / "last.ckpt")
        logger = cfg.trainer.logger
        if logger is True or logger is None:
            cfg.trainer.logger = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=str(root), name=name))
        elif isinstance(logger, Namespace) and logger.get("class_path") == CSV_LOGGER:
            if logger.init_args.get("name") in (None, "lightning_logs"):
                logger.init_args.name = name
        elif isinstance(logger, Namespace) and logger.get("class_path") == WANDB_LOGGER:
            if logger.init_args.get("save_dir") in (None, "."):
                logger.init_args.save_dir = os.environ.get("WANDB_DIR", str(root))
            if logger.init_args.get("name") is None:
                logger.init_args.name = name

    def _parse_ckpt_path(self) -> None:
        """Before Lightning's own step (the checkpoint's hyperparameters into the config): have the Trainer read every
        checkpoint weights-only and read ``--ckpt_path`` now (`zoo.checkpoints`), so that a checkpoint that is missing,
        corrupt or carries code stops the command before any work starts; and refuse ``--model.<name>`` options that
        contradict the checkpoint's hyperparameters, which LightningCLI rebuilds the model from (config files give way
        to them silently, as in Lightning)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        if cfg.get("weights_only") is False:
            raise ValueError(
                "--weights_only false is refused: a full pickle can run code when it is loaded, so the zoo reads "
                "checkpoints weights-only (see SECURITY.md)"
            )
        cfg.weights_only = True
        ckpt_path = cfg.get("ckpt_path")
        checkpoint = None
        if isinstance(ckpt_path, str) and not ckpt_path.startswith(PRETRAINED):
            checkpoint = check_ckpt_path(ckpt_path)
        if checkpoint is not None and Path(ckpt_path).is_file() and self._model_flags:  # (Lightning reads local ones)
            hparams = checkpoint.get("hyper_parameters", {})
            given = cfg.model.init_args
            clashes = [
                f"--model.{name} {given[name]!r} (the checkpoint has {hparams[name]!r})"
                for name in sorted(self._model_flags)
                if name in hparams and name in given and _plain(given[name]) != hparams[name]
            ]
            if clashes:
                raise ValueError(
                    f"{', '.join(clashes)}: the model is rebuilt from the hyperparameters of --ckpt_path {ckpt_path}; "
                    "drop these options, or give a checkpoint that has them"
                )
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self._published is not None:  # its weights win over --init_from
            hub.load_into(self.model, self._published)
            if self.subcommand:
                self.config_init[self.subcommand].ckpt_path = None  # the weights are in; nothing for Lightning to read
        elif cfg.init_from:
            hub.load_into(self.model, hub.read_published(cfg.init_from))
        callbacks = self.trainer.callbacks
        best = self.trainer.checkpoint_callback
        if best is not None and best.save_last is True:
            # Lightning 2.6 writes last.ckpt only when a new best is saved; keep the latest state at every save instead
            best.save_last = False
            callbacks.append(
                LastCheckpoint(
                    best.dirpath,
                    save_weights_only=best.save_weights_only,
                    every_n_train_steps=best._every_n_train_steps,
                    every_n_epochs=best._every_n_epochs,
                    train_time_interval=best._train_time_interval,
                    save_on_train_epoch_end=best._save_on_train_epoch_end,
                )
            )
        if not any(isinstance(c, ExactResume) for c in callbacks):
            callbacks.append(ExactResume())
        if self.trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))

    def predict(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None, **kwargs: Any) -> None:
        """Predict (on the test split when the DataModule has no predict split), save the outputs to
        ``<root>/<name>/predictions.pt``, let the model write its readable files there (``write_predictions``) and
        print where."""
        if datamodule is not None and not is_overridden("predict_dataloader", datamodule, L.LightningDataModule):
            datamodule.predict_dataloader = datamodule.test_dataloader
        outputs = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        cfg = self.config.predict
        path = Path(cfg.trainer.default_root_dir or "runs") / cfg.name / "predictions.pt"
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = _tensor_outputs(outputs)
            torch.save(tensors, path)
            print(f"predictions: {path}")
            writer = getattr(model, "write_predictions", None)
            for written in writer(tensors, datamodule, path.parent) if callable(writer) else []:
                print(f"predictions: {written}")

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        if self.trainer.is_global_zero:
            print(f"checkpoint: {best or '(none saved; tested the final weights)'}")
            for key, value in sorted(results[0].items() if results else []):
                split, _, metric = key.partition("/")
                print(f"{split} {METRIC_NAMES.get(metric, metric)}: {value:.4f}")


def _integers_first(parser: LightningArgumentParser) -> None:
    """Parse an integer as an int where an option takes ``int`` or ``float`` (``limit_*_batches``,
    ``val_check_interval``, ``overfit_batches``): ``--trainer.limit_test_batches 1`` is one batch, 1.0 all of them.

    typing caches unions and treats ``Union[int, float]`` and ``Union[float, int]`` as equal, so the Trainer's
    annotations can come out float first; jsonargparse tries a union's types in order, and float accepts 1 as 1.0.
    """
    for action in parser._actions:
        args = get_args(getattr(action, "_typehint", None))
        if int in args and float in args and args.index(float) < args.index(int):
            ordered = [int, *(a for a in args if a is not int)]
            action._typehint = reduce(operator.or_, ordered)  # an `int | float` keeps its order


def _plain(value: Any) -> Any:
    """A parsed value as the plain types a checkpoint's hyperparameters hold (a Namespace as a dict)."""
    return value.as_dict() if isinstance(value, Namespace) else value


def _tensor_outputs(outputs: list) -> Any:
    """Concatenate a list of per-batch tensors (the usual `predict_step` output); other outputs stay a list."""
    if outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat(outputs)
    return outputs


def expand_pretrained(args: list[str]) -> list[str]:
    """Replace ``--pretrained <model>`` by ``--config <its training config> ... --ckpt_path pretrained:<model>``.

    The published training config comes first, so the other arguments (e.g. ``--data.data_dir``) override it.
    """
    for i, arg in enumerate(args):
        if arg == "--pretrained" or arg.startswith("--pretrained="):
            name = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            rest = args[:i] + args[i + (1 if "=" in arg else 2) :]
            if not name or not rest or rest[0] not in ("validate", "test", "predict"):
                raise ValueError("--pretrained <model> goes with validate, test or predict (fit uses --init_from)")
            config = json.dumps(hub.read_published(name).training_config)
            return [rest[0], "--config", config, *rest[1:], f"--ckpt_path={PRETRAINED}{name}"]
    return args


def main(args: list[str] | None = None) -> ZooCLI:
    """Run the command line (``fit``, ``validate``, ``test``, ``predict``) on ``args`` (default: ``sys.argv``), with
    ``--pretrained <model>`` expanded (`expand_pretrained`)."""
    if args is None:
        sys.argv[1:] = expand_pretrained(sys.argv[1:])
        cli = ZooCLI()
    else:
        cli = ZooCLI(args=expand_pretrained(list(args)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up; gloo's threads then abort the process at exit now and then (SIGABRT)
        torch.distributed.destroy_process_group()
    return cli


if __name__ == "__main__":  # python -m zoo.cli fit --config ... (what train.py runs)
    main()
