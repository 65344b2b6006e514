"""The report of a study: a Markdown page with, per experiment and task, a table of the arms (mean ± std over seeds)
and its plots, built from the study directory's ``plan.yaml``, ``results.csv`` and the runs' ``curve.csv``.

    write_report(Path("runs/study"))                         # runs/study/report.md, plots in runs/study/report/
    write_report(Path("runs/study"), Path("docs/study.md"))  # docs/study.md, plots and results.csv in docs/study/
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib
import yaml

from zoo.study.plan import slug

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

DASH = "–"
UNITS = {"bpc": "bits/char", "acc": "fraction correct", "accuracy": "fraction correct"}
Curve = list[tuple[float, float, float]]  # (step, training seconds or nan, monitored value)


def higher_is_better(metric: str) -> bool:
    """Whether a metric (``test/acc``, ``val/bpc``) is better higher: accuracies are; losses and errors are not."""
    return metric.rsplit("/", 1)[-1].lower().endswith(("acc", "accuracy"))


def axis_label(metric: str) -> str:
    """``val/bpc`` -> ``val/bpc (bits/char, lower is better)``."""
    unit = UNITS.get(metric.rsplit("/", 1)[-1].lower())
    better = "higher is better" if higher_is_better(metric) else "lower is better"
    return f"{metric} ({unit}, {better})" if unit else f"{metric} ({better})"


def mean_std(values: list[float], bold: bool = False) -> str:
    """``1.234 ± 0.012`` (the sample std over seeds; one value alone; none as a dash), the mean in bold if ``bold``."""
    if not values:
        return DASH
    mean = f"{statistics.fmean(values):.3f}"
    mean = f"**{mean}**" if bold else mean
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f}"


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _values(rows: list[dict[str, str]], column: str) -> list[float]:
    return [v for v in (_float(r.get(column)) for r in rows) if v is not None]


def _load(study_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]], list[str]]:
    """The raw plan, the rows of ``results.csv`` and its columns."""
    plan_path, results_path = study_dir / "plan.yaml", study_dir / "results.csv"
    for path in (plan_path, results_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a study directory, or the study has not run yet")
    plan = yaml.safe_load(plan_path.read_text())
    if not isinstance(plan, dict) or not isinstance(plan.get("experiments"), dict):
        raise ValueError(f"{plan_path} is not a study plan (a mapping with experiments)")
    with results_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return plan, rows, list(reader.fieldnames or [])


def _colors(plan: dict[str, Any], rows: list[dict[str, str]]) -> dict[str, Any]:
    """One color per arm label, the same in every plot of the report."""
    labels = [str(arm) for exp in plan["experiments"].values() for arm in (exp or {}).get("arms") or {}]
    labels = list(dict.fromkeys(labels + [r["arm"] for r in rows]))
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]  # 18 colors far apart
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _read_curve(path: Path, monitor: str) -> Curve:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        points = [(_float(r.get("step")), _float(r.get("train_s")), _float(r.get(monitor))) for r in csv.DictReader(f)]
    return [(step, float("nan") if t is None else t, v) for step, t, v in points if step is not None and v is not None]


def epochs_to_best(path: Path, monitor: str) -> tuple[float, float] | None:
    """From a run's ``curve.csv``: the number of epochs up to its best validation of ``monitor`` and the training
    seconds per epoch; None where the curve has no epochs or spans fewer than two (a budget of steps, not epochs)."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(monitor) not in (None, "") and r.get("epoch") not in (None, "")]
    if len({r["epoch"] for r in rows}) < 2:
        return None
    pick = max if higher_is_better(monitor) else min
    best = pick(rows, key=lambda r: float(r[monitor]))
    seconds = _float(rows[-1].get("train_s"))
    per_epoch = seconds / (float(rows[-1]["epoch"]) + 1) if seconds is not None else float("nan")
    return float(best["epoch"]) + 1, per_epoch


def _aggregate(curves: list[Curve]) -> tuple[list[float], ...]:
    """Per step over seeds: steps, mean training seconds, mean, min and max of the monitored value."""
    by_step: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for points in curves:
        for step, seconds, value in points:
            by_step[step].append((seconds, value))
    steps = sorted(by_step)
    times = [statistics.fmean(t for t, _ in by_step[s]) for s in steps]  # nan where a seed has no clock
    values = [[v for _, v in by_step[s]] for s in steps]
    return steps, times, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


ZOOM_WIDTH = 4.0  # the zoomed window spans this many times the gap between the best value and the median final one
ZOOM_KEEP = 10.0  # and reaches every arm's final value within this many gaps of the best (further: off the axis)
ZOOM_WHEN = 4.0  # zoom where the full range of the curves is more than this many windows tall


def zoom_range(curves: dict[str, list[Curve]], monitor: str) -> tuple[float, float] | None:
    """A y-range on where the arms end, or None where the full range already shows it. From the best value of any
    arm's mean curve it spans ``ZOOM_WIDTH`` times the gap between that best and the median of the arms' final values
    (towards worse), widened to every final value within ``ZOOM_KEEP`` gaps, plus a tenth of its height on both sides.
    Early points (a first validation far off) and an arm far behind then leave the axis."""
    means = [_aggregate(arm_curves)[2] for arm_curves in curves.values() if any(arm_curves)]
    if len(means) < 2:
        return None
    up = higher_is_better(monitor)
    values = [v for mean in means for v in mean]
    best = max(values) if up else min(values)
    gaps = [abs(mean[-1] - best) for mean in means]
    gap = statistics.median(gaps)
    height = max([ZOOM_WIDTH * gap, *(g for g in gaps if g <= ZOOM_KEEP * gap)])
    if gap == 0 or max(values) - min(values) <= ZOOM_WHEN * 1.2 * height:
        return None
    pad = 0.1 * height
    return (best - height - pad, best + pad) if up else (best - pad, best + height + pad)


def plot_curves(curves: dict[str, list[Curve]], monitor: str, title: str, colors: dict[str, Any], path: Path) -> None:
    """The monitored validation metric against steps (left) and training seconds (right), one line per arm (mean over
    seeds, shaded min–max); below them the same zoomed on where the arms end, where `zoom_range` finds it needed."""
    zoom = zoom_range(curves, monitor)
    rows = 1 if zoom is None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(9, 3.8 + 3.0 * (rows - 1)), sharex="col", layout="constrained")
    axes = axes.reshape(rows, 2)
    for arm, arm_curves in curves.items():
        steps, times, mean, low, high = _aggregate(arm_curves)
        for row in axes:
            for ax, x in zip(row, (steps, times), strict=True):
                ax.plot(x, mean, color=colors[arm], marker="o", markersize=3, label=arm)
                if len(arm_curves) > 1:
                    ax.fill_between(x, low, high, color=colors[arm], alpha=0.2, linewidth=0)
    axes[0, 0].set(ylabel=axis_label(monitor), title="against steps")
    axes[0, 1].set(title="against training seconds")
    axes[0, 1].sharey(axes[0, 0])
    if zoom is not None:
        axes[1, 0].set(ylabel=f"{monitor}, zoomed", title="zoomed on where the arms end")
        axes[1, 1].set(title="(points beyond it are off the axis)")
        for ax in axes[1]:
            ax.set_ylim(*zoom)
    axes[-1, 0].set(xlabel="training step")
    axes[-1, 0].xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, not 20000: the labels stay apart
    axes[-1, 1].set(xlabel="training time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: validation {monitor} (mean over seeds, band: min–max)", fontsize="medium")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(curves), 6))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_test(values: dict[str, list[float]], metric: str, title: str, colors: dict[str, Any], path: Path) -> None:
    """The test metric per arm: the mean as a line with its value, each seed as a dot."""
    arms = [arm for arm, v in values.items() if v]
    fig, ax = plt.subplots(figsize=(min(8.0, max(6.0, 2.5 + 1.2 * len(arms))), 3.5), layout="constrained")
    for i, arm in enumerate(arms):
        seeds, mean = values[arm], statistics.fmean(values[arm])
        ax.hlines(mean, i - 0.3, i + 0.3, color=colors[arm], linewidth=2.5)
        ax.annotate(f"{mean:.3f}", (i + 0.32, mean), va="center", fontsize=8)
        offsets = [0.0] if len(seeds) == 1 else [-0.15 + 0.3 * k / (len(seeds) - 1) for k in range(len(seeds))]
        ax.scatter([i + o for o in offsets], seeds, color=colors[arm], edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=20 if max(len(a) for a in arms) > 10 else 0)
    ax.set_xlim(-0.6, len(arms) - 0.2)
    ax.set(ylabel=axis_label(metric), title=f"{title}\n{metric} (line: mean, dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(
    arms: list[str],
    rows: list[dict[str, str]],
    monitor: str,
    metric: str,
    evals: list[str],
    published: dict,
    by_epoch: dict[str, tuple[float, float]],
) -> list[str]:
    """The Markdown table of one experiment's task: a row per arm (``by_epoch``: `epochs_to_best` of each run's
    directory, where its curve counts epochs)."""
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in arms}
    done = {arm: [r for r in arm_rows if r["status"] == "done"] for arm, arm_rows in by_arm.items()}
    means = {arm: statistics.fmean(v) for arm in arms if (v := _values(done[arm], metric))}
    best = (max if higher_is_better(metric) else min)(means.values()) if means else None
    epochs = {r["run_dir"]: e for r in rows if r["status"] == "done" and (e := by_epoch.get(r["run_dir"])) is not None}
    per_epoch = ["epochs to best", "training s per epoch"] if epochs else []
    header = ["arm", "runs done", "steps", "training s per run", "ms per step", *per_epoch, f"best {monitor}"]
    header += [metric, *evals]
    lines = ["| " + " | ".join([*header, "published"]) + " |", "|" + "---|" * (len(header) + 1)]
    for arm in arms:
        runs = done[arm]
        failed = sum(r["status"] == "failed" for r in by_arm[arm])
        count = f"{len(runs)}/{len(by_arm[arm])}" + (f" ({failed} failed)" if failed else "")
        steps = sorted({int(s) for s in _values(runs, "steps")})
        steps_text = DASH if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
        train_s = _values(runs, "train_s")
        ms = [1000 * t / s for r in runs if (t := _float(r.get("train_s"))) is not None and (s := _float(r["steps"]))]
        entry = (published or {}).get(arm)
        cells = [
            arm,
            count,
            steps_text,
            f"{statistics.fmean(train_s):.1f}" if train_s else DASH,
            f"{statistics.fmean(ms):.1f}" if ms else DASH,
            *(_epoch_cells([epochs[r["run_dir"]] for r in runs if r["run_dir"] in epochs]) if epochs else []),
            mean_std(_values(runs, "best_val")),
            mean_std(_values(runs, metric), bold=arm in means and means[arm] == best),
            *(mean_std(_values(runs, column)) for column in evals),
            f"{entry['value']} ({entry['source']})" if entry else DASH,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _epoch_cells(values: list[tuple[float, float]]) -> list[str]:
    """The "epochs to best" and "training s per epoch" cells of an arm's runs."""
    if not values:
        return [DASH, DASH]
    best = sorted({int(e) for e, _ in values})
    text = str(best[0]) if len(best) == 1 else " / ".join(map(str, best))
    return [text, f"{statistics.fmean(s for _, s in values):.1f}"]


def _task_section(
    study_dir: Path,
    exp_name: str,
    exp: dict[str, Any],
    task_name: str,
    task: dict[str, Any],
    rows: list[dict[str, str]],
    columns: list[str],
    colors: dict[str, Any],
    fig_dir: Path,
) -> list[str]:
    """The Markdown of one task of an experiment: its table and plots (written into ``fig_dir``)."""
    title = str(task.get("title", task_name))
    lines = [f"### {title} (`{task_name}`)", ""]
    rows = [r for r in rows if r["experiment"] == exp_name and r["task"] == task_name]
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return lines + [f"No finished runs yet ({len(rows)} pending or failed).", ""]
    monitor = done[0]["monitor"]
    metric = task.get("metric") or "test/" + monitor.split("/", 1)[-1]
    evals = [f"{label}: {metric}" for label in task.get("evals") or {} if f"{label}: {metric}" in columns]
    evals += [c for c in task.get("columns") or [] if c in columns]  # the plan's extra test metrics
    arms = list(dict.fromkeys([*map(str, exp.get("arms") or {}), *(r["arm"] for r in rows)]))
    published = (exp.get("published") or {}).get(task_name) or {}
    by_epoch = {r["run_dir"]: e for r in done if (e := epochs_to_best(study_dir / r["run_dir"] / "curve.csv", monitor))}
    lines += _table(arms, rows, monitor, metric, evals, published, by_epoch) + [""]

    stem = f"{slug(exp_name)}_{slug(task_name)}"
    curves: dict[str, list[Curve]] = {}
    for row in done:
        points = _read_curve(study_dir / row["run_dir"] / "curve.csv", monitor)
        if points:
            curves.setdefault(row["arm"], []).append(points)
    if curves:
        plot_curves(curves, monitor, title, colors, fig_dir / f"{stem}_curves.png")
        lines += [f"![{title}: validation {monitor}]({quote(fig_dir.name)}/{stem}_curves.png)", ""]
    tests = {arm: _values([r for r in done if r["arm"] == arm], metric) for arm in arms}
    if any(tests.values()):
        plot_test(tests, metric, title, colors, fig_dir / f"{stem}_test.png")
        lines += [f"![{title}: {metric} per arm]({quote(fig_dir.name)}/{stem}_test.png)", ""]
    return lines


def _sessions(study_dir: Path) -> list[str]:
    """One line per distinct setting the runs were made with (``environment.json``, written by the runner)."""
    path = study_dir / "environment.json"
    if not path.exists():
        return []
    lines = []
    for env in json.loads(path.read_text()):
        gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
        line = (
            f"- {env.get('cpu')} ({env.get('cores')} cores{gpu}), PyTorch {env.get('torch')}, Python "
            f"{env.get('python')}; {env.get('workers')} runs at a time with {env.get('threads')} thread(s) each; "
            f"malloc settings {env.get('malloc') or 'default'}; fused LSTM step "
            f"{'compiled (C++ extension)' if env.get('lstm_step_extension') else 'in Python'}; "
            f"code at commit {env.get('commit') or 'unknown'}"
        )
        if line not in lines:
            lines.append(line)
    return lines


def write_report(
    study_dir: Path,
    dest: Path | None = None,
    plan_path: str = "configs/study/plan.yaml",
    notes: Path | None = None,
) -> Path:
    """Write the study's Markdown report to ``dest`` (default ``<study_dir>/report.md``), its plots and a copy of
    ``results.csv`` into ``<dest.parent>/<dest.stem>/``; return the report's path. ``plan_path`` is the plan named in
    the report's "How this was made"; ``notes``, a Markdown file of findings, goes under "Findings" after the header."""
    study_dir = Path(study_dir)
    plan, rows, columns = _load(study_dir)
    dest = Path(dest) if dest is not None else study_dir / "report.md"
    fig_dir = dest.parent / dest.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study_dir / "results.csv", fig_dir / "results.csv")
    colors = _colors(plan, rows)

    runs = {(r["task"], r["arm"], r["seed"]): r["status"] for r in rows}  # a run shared by experiments counts once
    counts = {s: sum(v == s for v in runs.values()) for s in ("done", "pending", "failed")}
    seeds = ", ".join(str(s) for s in plan.get("seeds", []))
    lines = [f"# {plan.get('title', 'Study')}", ""]
    lines += [str(plan["description"]).strip(), ""] if plan.get("description") else []
    lines += [
        f"Seeds: {seeds}. Runs: {len(runs)} ({counts['done']} done, {counts['pending']} pending, "
        f"{counts['failed']} failed). Every number is the mean ± sample standard deviation over the seeds "
        f"([results.csv]({quote(fig_dir.name)}/results.csv)).",
        "",
    ]
    if notes is not None:
        lines += ["## Findings", "", Path(notes).read_text().strip(), ""]
    tasks = plan.get("tasks") or {}
    for exp_name, exp in plan["experiments"].items():
        exp = exp or {}
        lines += [f"## {exp.get('title', exp_name)}", ""]
        lines += [f"**{str(exp['question']).strip()}**", ""] if exp.get("question") else []
        lines += [str(exp["description"]).strip(), ""] if exp.get("description") else []
        for task_name in exp.get("tasks") or []:
            task = tasks.get(task_name) or {}
            lines += _task_section(study_dir, exp_name, exp, task_name, task, rows, columns, colors, fig_dir)

    out = f" --out {dest}" if dest != study_dir / "report.md" else ""
    out += f" --notes {notes}" if notes is not None else ""
    lines += [
        "## How this was made",
        "",
        "```",
        f"python -m zoo.study {plan_path}",
        f"python -m zoo.study report {study_dir}{out}",
        "```",
        "",
        "Times are wall-clock training seconds (validation excluded) on the machine that ran the study:",
        "",
        *(_sessions(study_dir) or ["- (no environment.json: machine not recorded)"]),
        "",
    ]
    dest.write_text("\n".join(lines))
    return dest
