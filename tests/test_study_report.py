"""The study report (zoo/study/report.py) on a hand-made study directory: table values, bold best arm, published
values, run counts, plots and the copied results.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from zoo.study.report import epochs_to_best, write_report

PLAN = {
    "title": "A small study",
    "description": "Hand-made numbers.",
    "seeds": [0, 1],
    "tasks": {
        "ptb": {"config": "x.yaml", "title": "PTB chars", "metric": "test/bpc", "evals": {"length 1000": {"b": 1}}},
        "mnist": {"config": "y.yaml", "title": "pMNIST", "metric": "test/acc"},
    },
    "experiments": {
        "variants": {
            "title": "Which normalization?",
            "question": "Does BN help?",
            "tasks": ["ptb"],
            "arms": {"lstm": {}, "bn_lstm": {}},
            "published": {"ptb": {"bn_lstm": {"value": 1.32, "source": "Cooijmans et al. 2016"}}},
        },
        "widths": {
            "title": "How wide?",
            "question": "Does width help?",
            "tasks": ["ptb", "mnist"],
            "arms": {"lstm": {}, "wide": {}},
        },
    },
}
# (task, arm, seed): steps, train_s, best_val, test metric, eval metric; None: pending
RUNS = {
    ("ptb", "lstm", 0): (100, 20.0, 1.60, 1.50, 1.70),
    ("ptb", "lstm", 1): (100, 30.0, 1.62, 1.46, 1.66),
    ("ptb", "bn_lstm", 0): (100, 40.0, 1.50, 1.40, 1.90),
    ("ptb", "bn_lstm", 1): (100, 50.0, 1.58, 1.46, 1.80),
    ("ptb", "wide", 0): (100, 60.0, 1.70, 1.55, 1.75),
    ("ptb", "wide", 1): None,
    ("mnist", "lstm", 0): (50, 10.0, 0.90, 0.90, None),
    ("mnist", "lstm", 1): (50, 12.0, 0.92, 0.92, None),
    ("mnist", "wide", 0): (50, 15.0, 0.96, 0.95, None),
    ("mnist", "wide", 1): None,
}
METRIC = {"ptb": "bpc", "mnist": "acc"}


def make_study(root: Path) -> Path:
    """A study directory: plan.yaml, results.csv (one row per experiment x run) and each done run's curve.csv."""
    root.mkdir()
    (root / "plan.yaml").write_text(yaml.safe_dump(PLAN, sort_keys=False))
    rows = []
    for exp_name, exp in PLAN["experiments"].items():
        for task in exp["tasks"]:
            for arm in exp["arms"]:
                for seed in PLAN["seeds"]:
                    row = {"experiment": exp_name, "task": task, "arm": arm, "seed": seed, "status": "pending"}
                    values = RUNS[(task, arm, seed)]
                    if values is not None:
                        steps, train_s, best, test, evaluated = values
                        name = METRIC[task]
                        run_dir = f"runs/{task}/{arm}/seed{seed}"
                        row.update(status="done", steps=steps, train_s=train_s, wall_s=train_s + 5)
                        row.update({"monitor": f"val/{name}", "best_val": best, f"test/{name}": test})
                        row.update({"test/loss": test * 0.69, "run_dir": run_dir})
                        if evaluated is not None:
                            row["length 1000: test/bpc"] = evaluated
                        write_curve(root / run_dir, name, steps, train_s, best, seed)
                    rows.append(row)
    fields = ["experiment", "task", "arm", "seed", "status", "steps", "train_s", "wall_s", "monitor", "best_val"]
    fields += ["length 1000: test/bpc", "test/acc", "test/bpc", "test/loss", "run_dir"]
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_curve(run_dir: Path, name: str, steps: int, train_s: float, best: float, seed: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)  # a run shared by two experiments is written twice, alike
    sign = -1 if name == "acc" else 1
    with (run_dir / "curve.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_s", "val/loss", f"val/{name}"])
        for k in range(1, 6):
            value = best + sign * (0.5 / k - 0.1 + 0.02 * seed)
            writer.writerow([steps * k // 5, train_s * k / 5, value * 0.69, value])


def section(report: str, heading: str) -> str:
    """The text of one experiment's section (from its ``## `` heading to the next)."""
    start = report.index(f"## {heading}\n")
    end = report.find("\n## ", start + 1)
    return report[start : end if end >= 0 else None]


def cells(text: str, arm: str, after: str = "") -> list[str]:
    """The cells of the first table row of ``arm`` in ``text`` (after the line containing ``after``)."""
    text = text[text.index(after) :] if after else text
    line = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, str]:
    study = make_study(tmp_path / "study")
    path = write_report(study, tmp_path / "docs" / "study.md")
    return path, path.read_text()


def test_table_rows_are_mean_and_std_over_seeds(report: tuple[Path, str]) -> None:
    text = section(report[1], "Which normalization?")
    header = cells(text, "arm")
    assert header == [
        "arm", "runs done", "steps", "training s per run", "ms per step", "best val/bpc", "test/bpc",
        "length 1000: test/bpc", "published",
    ]  # fmt: skip
    # lstm: train 20, 30 s over 100 steps; best 1.60, 1.62; test 1.50, 1.46; eval 1.70, 1.66 (std = |a - b| / sqrt 2)
    assert cells(text, "lstm") == ["lstm", "2/2", "100", "25.0", "250.0", "1.610 ± 0.014", "1.480 ± 0.028",
                                   "1.680 ± 0.028", "–"]  # fmt: skip
    # bn_lstm: best 1.50, 1.58; test 1.40, 1.46 (the lower bpc: bold); eval 1.90, 1.80
    assert cells(text, "bn_lstm") == ["bn_lstm", "2/2", "100", "45.0", "450.0", "1.540 ± 0.057",
                                      "**1.430** ± 0.042", "1.850 ± 0.071", "1.32 (Cooijmans et al. 2016)"]  # fmt: skip


def test_pending_runs_are_counted_and_one_seed_is_shown_alone(report: tuple[Path, str]) -> None:
    text = report[1]
    # 10 distinct runs in 12 rows (ptb/lstm is shared by both experiments), 2 of them pending
    assert "Seeds: 0, 1. Runs: 10 (8 done, 2 pending, 0 failed)." in text
    widths = section(text, "How wide?")
    assert cells(widths, "wide", "PTB chars")[1:3] == ["1/2", "100"]
    assert cells(widths, "wide", "PTB chars")[6] == "1.550"
    assert cells(widths, "lstm", "PTB chars")[6] == "**1.480** ± 0.028"  # ptb/lstm's runs, shared with "variants"


def test_higher_accuracy_is_best(report: tuple[Path, str]) -> None:
    widths = section(report[1], "How wide?")
    assert cells(widths, "arm", "pMNIST")[5:7] == ["best val/acc", "test/acc"]
    assert cells(widths, "lstm", "pMNIST")[6] == "0.910 ± 0.014"
    assert cells(widths, "wide", "pMNIST")[6] == "**0.950**"


def test_sections_and_how_it_was_made(report: tuple[Path, str]) -> None:
    text = report[1]
    assert text.startswith("# A small study\n\nHand-made numbers.\n")
    assert "**Does BN help?**" in section(text, "Which normalization?")
    assert "**Does width help?**" in section(text, "How wide?")
    made = section(text, "How this was made")
    assert "python -m zoo.study configs/study/plan.yaml\n" in made
    assert f"python -m zoo.study report {report[0].parent.parent / 'study'} --out {report[0]}\n" in made


def test_plots_exist_open_and_results_are_copied(report: tuple[Path, str], tmp_path: Path) -> None:
    path, text = report
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    expected = {f"study/{e}_{t}_{kind}.png" for e, t in [("variants", "ptb"), ("widths", "ptb"), ("widths", "mnist")]
                for kind in ("curves", "test")}  # fmt: skip
    assert set(links) == expected
    for link in links:
        image = matplotlib.image.imread(path.parent / link)
        height, width = image.shape[:2]
        assert 250 <= height <= 500 and 300 <= width <= 1000, (link, image.shape)
        assert image[..., :3].std() > 0.05  # not blank
    copied = path.parent / "study" / "results.csv"
    assert copied.read_text() == (tmp_path / "study" / "results.csv").read_text()
    assert "(study/results.csv)" in text


def test_task_without_finished_runs_has_no_plot(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    results = study / "results.csv"
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["task"] == "mnist":
            row.update({k: "" for k in row if k not in ("experiment", "task", "arm", "seed")}, status="pending")
    with results.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path = write_report(study)
    assert path == study / "report.md"
    widths = section(path.read_text(), "How wide?")
    assert "### pMNIST (`mnist`)\n\nNo finished runs yet (4 pending or failed)." in widths
    assert not (study / "report" / "widths_mnist_curves.png").exists()
    assert not (study / "report" / "widths_mnist_test.png").exists()
    assert (study / "report" / "widths_ptb_curves.png").is_file()


@pytest.mark.parametrize("missing", ["results.csv", "plan.yaml"])
def test_missing_input_names_the_path(tmp_path: Path, missing: str) -> None:
    study = make_study(tmp_path / "study")
    (study / missing).unlink()
    with pytest.raises(FileNotFoundError, match=str(study / missing)):
        write_report(study)


def test_epochs_to_best_and_seconds_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "curve.csv"
    path.write_text("step,train_s,epoch,val/acc\n10,2.0,0,0.5\n20,4.0,1,0.8\n30,6.0,2,0.7\n40,8.0,3,0.8\n")
    assert epochs_to_best(path, "val/acc") == (2.0, 2.0)  # the first best (epoch index 1), 8 s over 4 epochs
    path.write_text("step,train_s,epoch,val/bpc\n10,3.0,0,2.0\n20,6.0,0,1.5\n")
    assert epochs_to_best(path, "val/bpc") is None  # one epoch only: a step budget, the columns are left out
    path.write_text("step,train_s,val/bpc\n10,3.0,2.0\n20,6.0,1.5\n")
    assert epochs_to_best(path, "val/bpc") is None


def test_a_task_trained_in_epochs_gets_epochs_to_best_and_seconds_per_epoch(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    for seed, best_epoch in ((0, 1), (1, 2)):  # pMNIST lstm: 4 epochs, the best in the 2nd and the 3rd
        values = [0.5, 0.6, 0.7, 0.65]
        values[best_epoch] = 0.9
        rows = "".join(f"{10 * (e + 1)},{5.0 * (e + 1)},{e},{v}\n" for e, v in enumerate(values))
        (study / f"runs/mnist/lstm/seed{seed}/curve.csv").write_text("step,train_s,epoch,val/acc\n" + rows)
    text = section(write_report(study, tmp_path / "report.md").read_text(), "How wide?")
    mnist = text[text.index("(`mnist`)") :]
    header = cells(mnist, "arm")
    assert header[5:7] == ["epochs to best", "training s per epoch"]
    assert cells(mnist, "lstm")[5:7] == ["2 / 3", "5.0"]  # 20 s over 4 epochs, both seeds
    assert cells(mnist, "wide")[5:7] == ["–", "–"]  # its curve counts no epochs


def test_a_tasks_columns_add_test_metrics_to_its_table(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    plan = yaml.safe_load((study / "plan.yaml").read_text())
    plan["tasks"]["mnist"]["columns"] = ["test/loss", "test/nothing"]  # a column no run has is left out
    (study / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    text = section(write_report(study, tmp_path / "report.md").read_text(), "How wide?")
    mnist = text[text.index("(`mnist`)") :]
    assert cells(mnist, "arm")[-2:] == ["test/loss", "published"]
    # lstm: test/acc 0.90, 0.92; test/loss = 0.69 x test/acc: 0.621, 0.6348
    assert cells(mnist, "lstm")[-2] == "0.628 ± 0.010"
