"""A study plan: tasks (a training config each), experiments (arms run on tasks), seeds; read and checked up front.

    title: Does normalization help recurrent networks?
    out_dir: runs/study          # where runs, results.csv and the report go (``--out`` overrides)
    seeds: [0, 1]
    workers: 2                   # runs at a time
    threads: 1                   # torch threads per run
    tasks:
      ptb_char:
        config: configs/study/ptb_char.yaml
        title: Penn Treebank characters
        metric: test/bpc         # the test metric the report puts first
        args: {}                 # command-line overrides for every run of the task
        columns: [test/loss]     # optional: more test metrics for the report's table
        evals:                   # optional: test the best checkpoint again with these overrides
          "length 1000": {data.init_args.bptt: 1000}
    experiments:
      variants:
        title: Which normalization?
        question: ...
        tasks: [ptb_char]
        seeds: [0]               # optional: this experiment's seeds (default: the plan's)
        arms:                    # label: command-line overrides
          lstm: {model.init_args.variant: lstm}
          bn_lstm: {model.init_args.variant: bn_lstm}
        published:               # optional, per task and arm: the papers' numbers
          ptb_char: {lstm: {value: 1.38, source: "Cooijmans et al. 2016, 1000 units"}}

A run is one (task, arm, seed); two experiments naming the same task and arm label share its runs (so their overrides
must agree). Runs live in ``<out>/runs/<task>/<arm>/seed<k>`` (the arm label made path-safe).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PLAN_KEYS = {"title", "description", "out_dir", "seeds", "workers", "threads", "tasks", "experiments"}
TASK_KEYS = {"config", "title", "metric", "args", "evals", "columns"}
EXPERIMENT_KEYS = {"title", "question", "description", "tasks", "arms", "published", "seeds"}


class PlanError(ValueError):
    """The plan is malformed (the message names the file and the entry)."""


@dataclass(frozen=True)
class Run:
    """One training run of the plan: a task, an arm and a seed, and the command-line arguments they make."""

    task: str
    arm: str
    seed: int
    config: str
    args: tuple[str, ...]
    evals: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def key(self) -> str:
        """The run's path below ``<out>/runs``: ``<task>/<arm>/seed<k>``."""
        return f"{self.task}/{slug(self.arm)}/seed{self.seed}"


@dataclass
class Experiment:
    name: str
    title: str
    question: str
    description: str
    tasks: list[str]
    arms: dict[str, dict[str, Any]]
    published: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    seeds: list[int] | None = None


@dataclass
class Task:
    name: str
    config: str
    title: str
    metric: str | None
    args: dict[str, Any]
    evals: dict[str, dict[str, Any]]
    columns: list[str] = field(default_factory=list)


@dataclass
class Plan:
    path: Path
    title: str
    description: str
    out_dir: Path
    seeds: list[int]
    workers: int
    threads: int
    tasks: dict[str, Task]
    experiments: dict[str, Experiment]
    raw: dict[str, Any]

    def runs(self, experiments: list[str] | None = None) -> list[Run]:
        """Every distinct run of the plan (or of the named experiments), in plan order, each once."""
        runs: dict[str, Run] = {}
        for exp in self.experiments.values():
            if experiments and exp.name not in experiments:
                continue
            for run in self.experiment_runs(exp):
                runs.setdefault(run.key, run)
        return list(runs.values())

    def experiment_runs(self, exp: Experiment) -> list[Run]:
        """The runs of one experiment: every task x arm x seed."""
        out = []
        for task_name in exp.tasks:
            task = self.tasks[task_name]
            for arm, overrides in exp.arms.items():
                args = tuple(cli_args(task.args) + cli_args(overrides))
                evals = tuple((label, tuple(cli_args(o))) for label, o in task.evals.items())
                for seed in exp.seeds or self.seeds:
                    out.append(Run(task_name, arm, seed, task.config, args, evals))
        return out


def slug(label: str) -> str:
    """A path-safe form of an arm label (``bn_lstm (shared)`` -> ``bn_lstm_shared``)."""
    return re.sub(r"_+", "_", re.sub(r"[^\w.\-]", "_", label)).strip("_") or "arm"


def cli_value(value: Any) -> str:
    """A YAML value as a LightningCLI argument value (mappings and lists as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def cli_args(overrides: dict[str, Any]) -> list[str]:
    """``{"trainer.max_steps": 100}`` -> ``["--trainer.max_steps=100"]``."""
    return [f"--{key}={cli_value(value)}" for key, value in overrides.items()]


def _mapping(value: Any, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _columns(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise PlanError(f"{where} must be a list of metric names, got {value!r}")
    return list(value)


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise PlanError(f"{where} must be a non-empty list of integers, got {value!r}")
    return list(value)


def load_plan(path: str | Path, out_dir: str | Path | None = None) -> Plan:
    """Read and check a plan; every error (a typo, a missing config, an experiment naming an unknown task, two
    experiments giving one run different overrides) is raised here, before any run starts."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no plan file {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlanError(f"{path} is not valid YAML: {err}") from err
    raw = _mapping(raw, str(path), PLAN_KEYS)
    seeds = _seeds(raw.get("seeds", [0]), f"{path}: seeds")
    workers, threads = raw.get("workers", 1), raw.get("threads", 1)
    for name, value in (("workers", workers), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{path}: {name} must be a positive integer, got {value!r}")

    tasks: dict[str, Task] = {}
    for name, spec in _mapping(raw.get("tasks"), f"{path}: tasks").items():
        spec = _mapping(spec, f"{path}: tasks.{name}", TASK_KEYS)
        config = spec.get("config")
        if not config or not Path(config).is_file():
            raise PlanError(
                f"{path}: tasks.{name}.config {config!r} is not a file (paths are relative to the "
                "directory the study runs from, like train.py's)"
            )
        evals = _mapping(spec.get("evals"), f"{path}: tasks.{name}.evals")
        tasks[name] = Task(
            name=name,
            config=str(config),
            title=str(spec.get("title", name)),
            metric=spec.get("metric"),
            args=_mapping(spec.get("args"), f"{path}: tasks.{name}.args"),
            evals={str(k): _mapping(v, f"{path}: tasks.{name}.evals.{k}") for k, v in evals.items()},
            columns=_columns(spec.get("columns", []), f"{path}: tasks.{name}.columns"),
        )
    if not tasks:
        raise PlanError(f"{path}: no tasks")

    experiments: dict[str, Experiment] = {}
    for name, spec in _mapping(raw.get("experiments"), f"{path}: experiments").items():
        spec = _mapping(spec, f"{path}: experiments.{name}", EXPERIMENT_KEYS)
        exp_tasks = spec.get("tasks") or []
        unknown = [t for t in exp_tasks if t not in tasks]
        if not isinstance(exp_tasks, list) or not exp_tasks or unknown:
            raise PlanError(
                f"{path}: experiments.{name}.tasks must list tasks of the plan ({', '.join(tasks)}); got {exp_tasks!r}"
            )
        arms = _mapping(spec.get("arms"), f"{path}: experiments.{name}.arms")
        if not arms:
            raise PlanError(f"{path}: experiments.{name} has no arms")
        arms = {str(k): _mapping(v, f"{path}: experiments.{name}.arms.{k}") for k, v in arms.items()}
        published = _mapping(spec.get("published"), f"{path}: experiments.{name}.published")
        for task_name, entries in published.items():
            for arm, entry in _mapping(entries, f"{path}: experiments.{name}.published.{task_name}").items():
                entry = _mapping(entry, f"{path}: experiments.{name}.published.{task_name}.{arm}", {"value", "source"})
                if "value" not in entry or "source" not in entry:
                    raise PlanError(f"{path}: experiments.{name}.published.{task_name}.{arm} needs value and source")
        experiments[name] = Experiment(
            name=name,
            title=str(spec.get("title", name)),
            question=str(spec.get("question", "")),
            description=str(spec.get("description", "")),
            tasks=list(exp_tasks),
            arms=arms,
            published=published,
            seeds=_seeds(spec["seeds"], f"{path}: experiments.{name}.seeds") if "seeds" in spec else None,
        )
    if not experiments:
        raise PlanError(f"{path}: no experiments")

    plan = Plan(
        path=path,
        title=str(raw.get("title", path.stem)),
        description=str(raw.get("description", "")),
        out_dir=Path(out_dir if out_dir is not None else raw.get("out_dir", f"runs/{path.stem}")),
        seeds=list(seeds),
        workers=workers,
        threads=threads,
        tasks=tasks,
        experiments=experiments,
        raw=raw,
    )
    seen: dict[str, tuple[Run, str]] = {}
    for exp in experiments.values():
        for run in plan.experiment_runs(exp):
            if run.key in seen and seen[run.key][0] != run:
                raise PlanError(
                    f"{path}: arm {run.arm!r} of task {run.task!r} has different overrides in experiments "
                    f"{seen[run.key][1]!r} and {exp.name!r}; give one of them another label"
                )
            seen.setdefault(run.key, (run, exp.name))
    return plan
