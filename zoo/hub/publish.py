"""Publishing: `export` a training checkpoint to the published format, `push` it to a directory or the Hugging Face
Hub (and record it in a manifest), `markdown_table` of the manifest."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

import zoo
from zoo.checkpoints import load_checkpoint
from zoo.data import sha256sum
from zoo.models import RecurrentModule
from zoo.study.runner import curve, monitor_of, read_metrics

from .format import (
    CARD,
    CONFIG,
    FILES,
    FORMAT,
    TASKS,
    WEIGHTS,
    HubError,
    ModelCard,
    build_model,
    load_weights,
    model_class,
    save_weights,
)
from .load import build_published, datamodule_for, evaluate, read_published
from .sources import HF_PREFIX, MANIFEST, PretrainedInfo, read_manifest, write_manifest

# data class -> (description, licence of the data)
DATASETS = {
    "SequentialDigits": (
        "UCI optdigits, 1797 8x8 digits read one pixel per step (64 steps)",
        "CC BY 4.0 (UCI Machine Learning Repository)",
    ),
    "TinyShakespeare": (
        "tiny-shakespeare (karpathy/char-rnn), 1,115,394 characters, 65 symbols",
        "public domain text (Shakespeare); compiled in karpathy/char-rnn (MIT)",
    ),
    "PennTreebank": ("Penn Treebank (Mikolov's preprocessing)", "free for research purposes (LDC material)"),
    "SequentialMNIST": ("MNIST, one pixel per step (784 steps)", "CC BY-SA 3.0 (LeCun and Cortes)"),
    "UCRArchive": ("{name} of the UCR/UEA time series archive", "per data set (timeseriesclassification.com)"),
    "CSVForecasting": ("{path}: {target}, {horizon} steps ahead from the last {input_len}", "ETT: CC BY-ND 4.0"),
}


def _dataset(data_config: dict[str, Any]) -> tuple[str, str]:
    """The data's description (the `DATASETS` entry, filled in from the config's init args) and its licence."""
    name = str(data_config["class_path"]).rpartition(".")[2]
    text, licence = DATASETS.get(name, (name, "unknown"))
    try:
        return text.format(**(data_config.get("init_args") or {})), licence
    except (KeyError, IndexError):
        return text, licence


def describe_hardware() -> str:
    """This machine: CPU model, cores, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores{gpu} (torch {torch.__version__})"


def find_run_config(checkpoint: str | Path) -> Path:
    """The ``config.yaml`` of the fit that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt``): the newest
    ``<run>/version_<n>/config.yaml`` written before the checkpoint (later versions are validate/test runs)."""
    checkpoint = Path(checkpoint)
    written = checkpoint.stat().st_mtime
    candidates = [p for p in checkpoint.parent.parent.glob("version_*/config.yaml") if p.stat().st_mtime <= written]
    if not candidates:
        raise HubError(f"{checkpoint}: no version_*/config.yaml beside its run folder; pass the config (--config)")
    return max(candidates, key=lambda p: int(p.parent.name.rpartition("_")[2]))


def _training_time(ckpt: dict[str, Any]) -> float | None:
    """Seconds of training up to the checkpoint, if a Timer callback recorded them in it."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("Timer") and "time_elapsed" in state:
            return float(state["time_elapsed"]["train"])
    return None


def _split_description(datamodule: Any) -> str:
    """Sizes of the splits, as the DataModule holds them after ``setup``."""
    datamodule.setup("test")
    if hasattr(datamodule, "streams"):
        sizes = {s: len(t) for s, t in datamodule.streams.items()}
        return "in order: " + ", ".join(f"{s} {n:,} symbols" for s, n in sizes.items())
    sets = {s: getattr(datamodule, f"{s}_set", None) for s in ("train", "val", "test")}
    return ", ".join(f"{s} {len(d):,}" for s, d in sets.items() if d is not None) or type(datamodule).__name__


def _measured(task: str, metric: str, datamodule: Any) -> str:
    """How the headline metric was measured."""
    if task == "language modelling":
        windows = datamodule.windows("test")
        rows, steps = windows.data.shape
        return (
            f"{metric}: mean cross-entropy in bits over all {rows * (steps - 1):,} predicted test symbols, read as "
            f"{rows} contiguous streams in windows of {windows.bptt} with the hidden state carried between windows "
            "(zero at the start), model in eval mode: `trainer.test`, as `train.py test` computes it"
        )
    if task == "sequence classification":
        n = len(datamodule.test_set) if getattr(datamodule, "test_set", None) is not None else "all"
        return f"{metric}: accuracy over all {n} test sequences, model in eval mode (`trainer.test`, `train.py test`)"
    return f"{metric} over all test windows, model in eval mode (`trainer.test`, `train.py test`)"


def _training_description(config: dict[str, Any], ckpt: dict[str, Any], monitor: str) -> str:
    trainer = config.get("trainer") or {}
    steps = trainer.get("max_steps") or -1
    budget = f"{steps} steps" if steps > 0 else f"{trainer.get('max_epochs')} epochs"
    for callback in trainer.get("callbacks") or []:  # what else ends the run: early stopping, a time cap
        name, args = str(callback.get("class_path", "")).rpartition(".")[2], callback.get("init_args") or {}
        if name == "EarlyStopping":
            budget = f"at most {budget}, early stopping on {args.get('monitor')} (patience {args.get('patience', 3)})"
        elif name == "Timer" and args.get("duration"):
            budget += f", at most {args['duration']} (d:h:m:s, Timer)"
    optimizer = config.get("optimizer") or {}
    lr = (optimizer.get("init_args") or {}).get("lr")
    scheduler = (config.get("lr_scheduler") or {}).get("class_path", "none").rpartition(".")[2]
    score = next(  # the ModelCheckpoint that monitors this metric (the "last" one monitors nothing)
        (
            s.get("best_model_score")
            for k, s in ckpt.get("callbacks", {}).items()
            if k.startswith("ModelCheckpoint") and s.get("monitor") == monitor
        ),
        None,
    )
    best = f", the best on {monitor} ({float(score):.4f})" if score is not None else ""
    return (
        f"{budget}, {str(optimizer.get('class_path', '?')).rpartition('.')[2]} lr {lr}, scheduler {scheduler}, "
        f"gradient clip {trainer.get('gradient_clip_val')}, seed {config.get('seed_everything')}; published: the "
        f"checkpoint of epoch {ckpt.get('epoch', 0) + 1}, step {ckpt.get('global_step')}{best}"
    )


def convergence(points: list[dict[str, float]], monitor: str, mode: str, last: int = 5) -> str:
    """How the validation curve of ``monitor`` ended, the card's proof that training converged: the best value and the
    step it came at, how many validations followed it, how far the last ``last`` validations lie from the best, and
    their least-squares slope per 1000 steps. ``points`` are ``{"step": ..., monitor: ...}`` in step order."""
    curve = [(p["step"], p[monitor]) for p in points if monitor in p]
    if not curve:
        return ""
    pick = min if mode == "min" else max
    best_at = pick(range(len(curve)), key=lambda i: curve[i][1])
    best_step, best = curve[best_at]
    tail = curve[-last:]
    spread = max(abs(v - best) for _, v in tail) / max(abs(best), 1e-12)
    slope = 0.0
    if len(tail) > 1:
        mean_s = sum(s for s, _ in tail) / len(tail)
        mean_v = sum(v for _, v in tail) / len(tail)
        var = sum((s - mean_s) ** 2 for s, _ in tail)
        slope = sum((s - mean_s) * (v - mean_v) for s, v in tail) / var * 1000 if var else 0.0
    return (
        f"best {monitor} {best:.4f} at step {best_step:.0f} (validation {best_at + 1} of {len(curve)}; "
        f"{len(curve) - best_at - 1} after it without improvement); the last {len(tail)} validations within "
        f"{100 * spread:.2f}% of the best, slope {slope:+.4f} per 1000 steps"
    )


def export(
    checkpoint: str | Path,
    directory: str | Path,
    config: str | Path | None = None,
    name: str | None = None,
    command: str | None = None,
    training_time_s: float | None = None,
    hardware: str | None = None,
    data_overrides: dict[str, Any] | None = None,
) -> ModelCard:
    """Write the published files of a Lightning checkpoint to ``directory`` and return its card.

    The checkpoint is read weights-only (`zoo.checkpoints.load_checkpoint`). ``config`` is the run's resolved
    ``config.yaml`` (found beside the run by default, see `find_run_config`). The card's metrics are measured here: the
    exported model is read back from ``directory`` and tested on the config's data (``data_overrides`` change its init
    args, e.g. ``data_dir``).
    ``training_time_s`` is the wall time of the training command; without it, the time up to the checkpoint that a
    Timer callback recorded in it (Lightning writes a best checkpoint when the metric improves, so this can be less
    than the whole run). The hardware is this machine unless ``hardware`` is given.
    """
    checkpoint, directory = Path(checkpoint), Path(directory)
    ckpt = load_checkpoint(checkpoint)
    config_path = Path(config) if config else find_run_config(checkpoint)
    training_config = yaml.safe_load(config_path.read_text())
    hparams = dict(ckpt["hyper_parameters"])
    class_path = hparams.get("_class_path") or training_config["model"]["class_path"]
    cls = model_class(f"zoo.models.{class_path.rpartition('.')[2]}")
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path etc.
    model: RecurrentModule = cls(**init_args)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    variant = init_args["variant"]
    task = TASKS[cls.__name__]
    name = name or str(training_config.get("name") or f"{task}-{variant}").replace("/", "-")
    published_config = {
        "format": FORMAT,
        "zoo_version": zoo.__version__,
        "name": name,
        "task": task,
        "variant": variant,
        "model": {"class_path": f"zoo.models.{cls.__name__}", "init_args": init_args},
        "vocab": ckpt.get("vocab"),
        "training_config": training_config,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(published_config, indent=2, ensure_ascii=False) + "\n", "utf-8")

    dataset, licence = _dataset(training_config["data"])
    datamodule = datamodule_for(training_config, **(data_overrides or {}))
    metric = cls.monitor.replace("val/", "test/")
    monitor, mode = monitor_of(config_path)
    points = curve(read_metrics(config_path.parent.parent))  # every version_*/metrics.csv of the run
    reloaded = build_model(published_config, directory / CONFIG)  # measure what was written, read back
    load_weights(directory / WEIGHTS, reloaded)
    if published_config["vocab"] is not None:
        reloaded.vocab = list(published_config["vocab"])
    metrics = evaluate(reloaded.eval(), datamodule)
    if metric not in metrics:
        raise HubError(f"testing {name} gave no {metric} (got {sorted(metrics)})")
    card = ModelCard(
        name=name,
        task=task,
        variant=variant,
        dataset=dataset,
        split=_split_description(datamodule),
        licence=licence,
        metric=metric,
        metrics=metrics,
        measured=_measured(task, metric, datamodule),
        training=_training_description(training_config, ckpt, monitor),
        convergence=convergence(points, monitor, mode),
        training_time_s=training_time_s if training_time_s is not None else _training_time(ckpt),
        hardware=hardware or describe_hardware(),
        command=command or f"python train.py fit --config {config_path}",
        evaluate=f"python train.py test --pretrained {name}",
        paper=_paper(variant),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    (directory / CARD).write_text(card.to_markdown(), "utf-8")
    return ModelCard.from_markdown((directory / CARD).read_text("utf-8"), directory / CARD)


def _paper(variant: str) -> str:
    from zoo.nn import get_variant

    v = get_variant(variant)
    return f"{v.paper}: {v.description}"


def push(
    directory: str | Path,
    target: str,
    name: str | None = None,
    source: str | None = None,
    manifest: str | Path | None = None,
) -> PretrainedInfo:
    """Publish the model in ``directory`` to ``target`` and return its manifest entry.

    The model is first loaded in full (config, card, weights checked), so nothing broken is published. ``target`` is
    ``hf://<owner>/<repo>`` (uploaded with ``huggingface_hub``; the token comes from ``HF_TOKEN`` or
    ``huggingface-cli login``) or a local directory (the files are copied and verified there; serve it over HTTP to
    publish by URL). The entry's ``source`` is ``source`` if given (e.g. the URL that will serve the directory), else
    the target (a directory inside the manifest's folder is recorded relative to it). With ``manifest``, the entry is
    written into that manifest under ``name`` (default: the card's name).
    """
    directory = Path(directory)
    published = read_published(directory)
    build_published(published)
    card = published.card
    files = {f: sha256sum(directory / f) for f in FILES}
    if target.startswith(HF_PREFIX):
        from huggingface_hub import HfApi

        repo_id = target[len(HF_PREFIX) :].partition("@")[0]
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            allow_patterns=list(FILES),
            commit_message=f"zoo.hub: {card.name} ({card.metric} {card.value:.4f})",
        )
        recorded = source or target
    else:
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            if (directory / f).resolve() != (out / f).resolve():
                shutil.copyfile(directory / f, out / f)
            if sha256sum(out / f) != files[f]:
                raise HubError(f"{out / f}: the copy does not match {directory / f}")
        recorded = source or _relative_to_manifest(out, manifest)
    entry = PretrainedInfo(
        name=name or card.name,
        task=card.task,
        variant=card.variant,
        dataset=card.dataset,
        metric=card.metric,
        value=round(card.value, 6),
        size=sum((directory / f).stat().st_size for f in FILES),
        parameters=card.parameters,
        licence=card.licence,
        source=recorded,
        files=files,
        metrics={k: round(v, 6) for k, v in card.metrics.items()},
        training_time_s=None if card.training_time_s is None else round(card.training_time_s, 1),
    )
    if manifest is not None:
        entries = read_manifest(manifest)
        entries[entry.name] = entry
        write_manifest(entries, manifest)
    return entry


def _relative_to_manifest(path: Path, manifest: str | Path | None) -> str:
    base = Path(manifest or MANIFEST).resolve().parent
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path.resolve())


def markdown_table(manifest: str | Path = MANIFEST) -> str:
    """The manifest as a Markdown table (docs/hub.md)."""
    rows = [
        "| name | task | variant | data | data licence | metric | parameters | size | training time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in read_manifest(manifest).values():
        minutes = f"{e.training_time_s / 60:.1f} min" if e.training_time_s is not None else "—"
        rows.append(
            f"| `{e.name}` | {e.task} | `{e.variant}` | {e.dataset} | {e.licence} | {e.metric} {e.value:.4f} | "
            f"{e.parameters:,} | {e.size / 1e6:.2f} MB | {minutes} |"
        )
    return "\n".join(rows)
