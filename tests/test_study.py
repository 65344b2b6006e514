"""zoo.study: plan checks, the runner's log parsing, a tiny plan end to end (runs, skip, report), kill and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from needs_data import needs_data

import zoo.nn
from zoo.study import PlanError, load_plan
from zoo.study.__main__ import main
from zoo.study.plan import cli_args, slug
from zoo.study.report import zoom_range
from zoo.study.runner import curve, last_test_metrics, monitor_of, read_metrics

UCR = "configs/study/ucr.yaml"
needs_italy = needs_data("ucr_uea/ItalyPowerDemand")  # (the plans below fit on it)
TINY = {
    "data.init_args.name": "ItalyPowerDemand",
    "trainer.max_steps": 6,
    "trainer.val_check_interval": 3,
    "model.init_args.hidden_size": 8,
}


def write_plan(path: Path, steps: int = 6, every: int = 3, arms: tuple[str, ...] = ("lstm", "ln_lstm")) -> Path:
    plan = {
        "title": "tiny",
        "seeds": [0],
        "workers": 2,
        "tasks": {
            "italy": {
                "config": UCR,
                "metric": "test/acc",
                "args": {**TINY, "trainer.max_steps": steps, "trainer.val_check_interval": every},
                "evals": {"batch 4": {"data.init_args.batch_size": 4}},
            }
        },
        "experiments": {
            "variants": {
                "title": "Which?",
                "question": "Which one?",
                "tasks": ["italy"],
                "arms": {a: {"model.init_args.variant": a} for a in arms},
            }
        },
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------------ the plan


def test_plan_expands_tasks_arms_seeds_and_shares_runs(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_plan(tmp_path / "p.yaml").read_text())
    raw["seeds"] = [0, 1]
    raw["experiments"]["again"] = {"tasks": ["italy"], "arms": {"lstm": {"model.init_args.variant": "lstm"}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = load_plan(tmp_path / "p.yaml", tmp_path / "out")
    keys = [r.key for r in plan.runs()]
    assert keys == ["italy/lstm/seed0", "italy/lstm/seed1", "italy/ln_lstm/seed0", "italy/ln_lstm/seed1"]
    assert [r.key for r in plan.runs(["again"])] == ["italy/lstm/seed0", "italy/lstm/seed1"]
    run = plan.runs()[0]
    assert "--model.init_args.variant=lstm" in run.args and "--trainer.max_steps=6" in run.args
    assert run.evals == (("batch 4", ("--data.init_args.batch_size=4",)),)


def test_an_experiment_may_name_its_own_seeds(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_plan(tmp_path / "p.yaml").read_text())
    lstm = {"lstm": {"model.init_args.variant": "lstm"}}
    raw["experiments"]["seeds"] = {"tasks": ["italy"], "seeds": [0, 1], "arms": lstm}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = load_plan(tmp_path / "p.yaml", tmp_path / "out")
    assert [r.key for r in plan.runs(["variants"])] == ["italy/lstm/seed0", "italy/ln_lstm/seed0"]
    assert [r.key for r in plan.runs()] == ["italy/lstm/seed0", "italy/ln_lstm/seed0", "italy/lstm/seed1"]


def test_monitor_is_the_configs_checkpoint_monitor_else_the_models(tmp_path: Path) -> None:
    config = {"model": {"class_path": "zoo.models.SequenceClassifier"}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    assert monitor_of(tmp_path / "a.yaml") == ("val/acc", "max")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**config, "checkpoint": {"monitor": "val/loss", "mode": "min"}}))
    assert monitor_of(tmp_path / "b.yaml") == ("val/loss", "min")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.update(seed=[0]), r"unknown key\(s\) seed"),
        (lambda p: p["experiments"]["variants"].update(seeds=[]), r"experiments.variants.seeds must be a non-empty"),
        (lambda p: p["tasks"]["italy"].update(columns="test/loss"), r"tasks.italy.columns must be a list"),
        (lambda p: p["tasks"]["italy"].update(config="configs/study/nope.yaml"), r"tasks.italy.config .*nope.yaml"),
        (lambda p: p["experiments"]["variants"].update(tasks=["itally"]), r"experiments.variants.tasks must list"),
        (lambda p: p["experiments"]["variants"].update(arms={}), r"experiments.variants has no arms"),
        (lambda p: p.update(seeds=[]), r"seeds must be a non-empty list"),
        (lambda p: p.update(workers=0), r"workers must be a positive integer"),
        (
            lambda p: p["experiments"].update(
                other={"tasks": ["italy"], "arms": {"lstm": {"model.init_args.variant": "gru"}}}
            ),
            r"arm 'lstm' of task 'italy' has different overrides in experiments 'variants' and 'other'",
        ),
        (
            lambda p: p["experiments"]["variants"].update(published={"italy": {"lstm": {"value": 0.9}}}),
            r"published.italy.lstm needs value and source",
        ),
    ],
)
def test_plan_errors_before_any_run(tmp_path: Path, edit, message: str) -> None:
    raw = yaml.safe_load(write_plan(tmp_path / "p.yaml").read_text())
    edit(raw)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(PlanError, match=message):
        load_plan(tmp_path / "p.yaml")


def test_unknown_experiment_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(write_plan(tmp_path / "p.yaml")), "--only", "variantz", "--dry-run"])
    assert exc.value.code == 2
    assert "--only: no experiment variantz" in capsys.readouterr().err


def test_cli_args_and_slug() -> None:
    overrides = {"a.b": 1, "c": True, "d": None, "e": {"gamma": 1.0}, "f": [1, 2], "g": "x y"}
    assert cli_args(overrides) == ["--a.b=1", "--c=true", "--d=null", '--e={"gamma": 1.0}', "--f=[1, 2]", "--g=x y"]
    assert slug("bn_lstm (shared statistics)") == "bn_lstm_shared_statistics"
    assert slug("gamma = 1.0") == "gamma_1.0"


# ------------------------------------------------------------------------------------------------ reading the logs


def test_curve_merges_a_resumed_runs_logs(tmp_path: Path) -> None:
    """Validation rows by step; the resumed version's rows win where both logged the same step."""
    header = "epoch,step,time/train_s,train/loss,val/acc,val/loss,test/acc\n"
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / "metrics.csv").write_text(
        header + "0,4,,0.9,,,\n0,9,1.5,,0.5,0.7,\n0,19,3.0,,0.6,0.6,\n"  # killed after step 20's validation
    )
    (tmp_path / "version_1").mkdir()
    (tmp_path / "version_1" / "metrics.csv").write_text(
        header + "0,19,3.25,,0.625,0.59,\n0,29,4.5,,0.7,0.5,\n1,30,,,,,0.69\n"
    )
    rows = read_metrics(tmp_path)
    assert curve(rows) == [
        {"step": 10, "train_s": 1.5, "epoch": 0.0, "val/acc": 0.5, "val/loss": 0.7},
        {"step": 20, "train_s": 3.25, "epoch": 0.0, "val/acc": 0.625, "val/loss": 0.59},
        {"step": 30, "train_s": 4.5, "epoch": 0.0, "val/acc": 0.7, "val/loss": 0.5},
    ]
    assert last_test_metrics(rows) == {"test/acc": 0.69}


# -------------------------------------------------------------------------------------------------------- end to end


@needs_italy
def test_tiny_plan_end_to_end_then_skipped_then_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan, out = write_plan(tmp_path / "p.yaml"), tmp_path / "out"
    assert main([str(plan), "--out", str(out)]) == 0
    rows = read_csv(out / "results.csv")
    assert [(r["arm"], r["status"], r["steps"]) for r in rows] == [("lstm", "done", "6"), ("ln_lstm", "done", "6")]
    for row in rows:
        assert 0.0 <= float(row["test/acc"]) <= 1.0 and 0.0 <= float(row["batch 4: test/acc"]) <= 1.0
        # the eval tests the same checkpoint on the same data: only the batch size differs
        assert float(row["batch 4: test/acc"]) == pytest.approx(float(row["test/acc"]), abs=1e-6)
        assert row["monitor"] == "val/acc" and float(row["train_s"]) > 0 and float(row["wall_s"]) > 0
        points = read_csv(out / row["run_dir"] / "curve.csv")
        assert [p["step"] for p in points] == ["3", "6"]
        assert float(points[0]["train_s"]) < float(points[1]["train_s"]) <= float(row["train_s"]) + 1e-9
        assert float(row["best_val"]) == max(float(p["val/acc"]) for p in points)
    assert (out / "plan.yaml").exists()

    capsys.readouterr()
    versions = sorted(out.glob("runs/italy/*/seed0/version_*"))
    assert main([str(plan), "--out", str(out)]) == 0  # everything is done: nothing runs again
    assert "2 runs, 2 finished" in capsys.readouterr().out
    assert sorted(out.glob("runs/italy/*/seed0/version_*")) == versions

    sessions = json.loads((out / "environment.json").read_text())
    assert len(sessions) == 1 and sessions[0]["cores"] == os.cpu_count() and sessions[0]["workers"] == 2

    notes = tmp_path / "findings.md"
    notes.write_text("LayerNorm wins here.\n")
    assert main(["report", str(out), "--notes", str(notes)]) == 0
    report = (out / "report.md").read_text()
    assert "## Findings\n\nLayerNorm wins here." in report
    assert f"- {sessions[0]['cpu']} ({os.cpu_count()} cores)" in report
    assert "| lstm |" in report.replace("**", "") and "| ln_lstm |" in report.replace("**", "")
    images = [line.split("](")[1].split(")")[0] for line in report.splitlines() if line.startswith("![")]
    assert images and all((out / image).stat().st_size > 1000 for image in images)


def test_dry_run_lists_states_and_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan, out = write_plan(tmp_path / "p.yaml"), tmp_path / "out"
    (out / "runs/italy/ln_lstm/seed0/checkpoints").mkdir(parents=True)
    (out / "runs/italy/ln_lstm/seed0/checkpoints/last.ckpt").write_bytes(b"")
    assert main([str(plan), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pending  italy/lstm/seed0: python -m zoo.cli fit --config=configs/study/ucr.yaml")
    assert lines[1].startswith("resume   italy/ln_lstm/seed0:") and lines[1].endswith("--ckpt_path=last")
    assert not (out / "results.csv").exists()


@needs_italy
def test_killed_study_resumes_where_it_stopped(tmp_path: Path) -> None:
    """SIGTERM the study while a run trains; the next start resumes that run from its last checkpoint."""
    plan, out = write_plan(tmp_path / "p.yaml", steps=1000, every=50, arms=("lstm",)), tmp_path / "out"
    cmd = [sys.executable, "-m", "zoo.study", str(plan), "--out", str(out)]
    rdir = out / "runs/italy/lstm/seed0"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (rdir / "checkpoints/last.ckpt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted: run the same command again to resume" in output
    assert not (rdir / "result.json").exists()
    first = read_metrics(rdir)
    assert first and max(int(r["step"]) for r in first) + 1 < 1000  # it stopped before the end

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--ckpt_path=last" in (rdir / "log.txt").read_text()
    result = json.loads((rdir / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 1000
    steps = [p["step"] for p in curve(read_metrics(rdir))]
    assert steps == list(range(50, 1001, 50))  # one curve: the resumed run continued the first
    assert len(list(rdir.glob("version_*"))) == 2


@needs_italy
def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan, out = write_plan(tmp_path / "p.yaml", arms=("nope", "lstm")), tmp_path / "out"
    assert main([str(plan), "--out", str(out)]) == 1
    assert "FAILED italy/nope/seed0: fit exited with" in capsys.readouterr().out
    assert [(r["arm"], r["status"]) for r in read_csv(out / "results.csv")] == [("nope", "failed"), ("lstm", "done")]
    assert "unknown variant 'nope'" in (out / "runs/italy/nope/seed0/log.txt").read_text().lower()


@needs_italy
def test_a_failed_eval_is_retried_without_refitting(tmp_path: Path) -> None:
    path, out = write_plan(tmp_path / "p.yaml", arms=("lstm",)), tmp_path / "out"
    raw = yaml.safe_load(path.read_text())
    raw["tasks"]["italy"]["evals"] = {"broken": {"data.init_args.nope": 1}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(path), "--out", str(out)]) == 1
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["failed"]
    rdir = out / "runs/italy/lstm/seed0"
    assert json.loads((rdir / "result.json").read_text())["steps"] == 6  # the fit's result is kept

    raw["tasks"]["italy"]["evals"] = {"batch 4": {"data.init_args.batch_size": 4}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(path), "--out", str(out)]) == 0
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["done"]
    assert (rdir / "log.txt").read_text().count(" fit --config") == 1
    assert not (rdir / "failed.txt").exists()


def test_the_committed_plan_is_valid() -> None:
    plan = load_plan("configs/study/plan.yaml")
    assert len(plan.seeds) >= 2 and {"variants", "statistics", "input_only", "gamma"} <= set(plan.experiments)
    # 4 tasks x 10 variants, plus the ablation arms not shared with them (3 arms x 2 tasks, h0 noise on pmnist)
    assert len(plan.runs()) == (4 * 10 + 3 * 2 + 1) * len(plan.seeds) == 94


def test_the_converged_zoo_plan_covers_every_variant() -> None:
    """configs/zoo/plan.yaml: the ten variants on PTB characters, ETTh1 and UCR, the three published shakespeare
    variants, a second seed of lstm, bn_lstm and ln_lstm on PTB characters; every run with early stopping."""
    plan = load_plan("configs/zoo/plan.yaml")
    variants = {v.name for v in zoo.nn.list_variants()}
    runs = plan.runs()
    for task in ("ptb_char", "ett", "ucr"):
        assert {r.arm for r in runs if r.task == task and r.seed == 0} == variants
    assert {r.arm for r in runs if r.task == "shakespeare"} == {"lstm", "bn_lstm", "ln_lstm"}
    assert {r.arm for r in runs if r.seed == 1} == {"lstm", "bn_lstm", "ln_lstm"}
    assert len(runs) == 3 * 10 + 3 + 3
    for task in plan.tasks.values():
        config = yaml.safe_load(Path(task.config).read_text())
        callbacks = config["trainer"]["callbacks"]
        stops = [c for c in callbacks if c["class_path"].endswith("EarlyStopping")]
        assert len(stops) == 1 and config["lr_scheduler"]["class_path"].endswith("ReduceLROnPlateau")
        # the cap is the Timer's: Lightning ignores trainer.max_time when the callbacks hold a Timer
        (timer,) = [c for c in callbacks if c["class_path"].endswith("Timer")]
        assert timer["init_args"]["duration"] == "00:00:45:00" and "max_time" not in config["trainer"]


def _curves(*arms: list[float]) -> dict[str, list[list[tuple[float, float, float]]]]:
    """One seed per arm, a validation every 100 steps."""
    return {f"arm{i}": [[(100.0 * (k + 1), float(k), v) for k, v in enumerate(vs)]] for i, vs in enumerate(arms)}


def test_zoom_range_frames_where_the_arms_end_when_an_early_point_stretches_the_axis() -> None:
    # best 1.5; the finals 1.5 and 1.55 have median 1.525: 4 x 0.025 = 0.1 tall above the best, plus 0.01 each side;
    # the full range (1.5 to 5.0) is far more than 4 windows, so the plot zooms.
    low, high = zoom_range(_curves([5.0, 2.0, 1.5], [2.0, 1.6, 1.55]), "val/bpc")
    assert (low, high) == pytest.approx((1.49, 1.61))
    # accuracies: the window lies below the best (0.9; finals 0.9 and 0.86, median 0.88: 0.08 tall).
    low, high = zoom_range(_curves([0.1, 0.7, 0.9], [0.1, 0.6, 0.86]), "val/acc")
    assert (low, high) == pytest.approx((0.812, 0.908))


def test_zoom_range_keeps_every_final_value_near_the_others_and_drops_one_far_behind() -> None:
    # best 1.50; finals 1.50, 1.51 and 1.58 (median gap 0.01): 1.58 is 8 gaps away, within 10, so the window
    # reaches it (0.08 tall, not 0.04); with one more final at 1.51 the median gap stays 0.01, and 2.5 (100 gaps) is
    # left off the axis.
    arms = [[5.0, 1.50], [2.0, 1.51], [2.0, 1.58]]
    assert zoom_range(_curves(*arms), "val/bpc") == pytest.approx((1.492, 1.588))
    assert zoom_range(_curves(*arms, [2.0, 1.51], [3.0, 2.5]), "val/bpc") == pytest.approx((1.492, 1.588))


def test_zoom_range_leaves_curves_alone_that_the_full_axis_shows() -> None:
    assert zoom_range(_curves([0.14, 0.13, 0.12], [0.13, 0.12, 0.125]), "val/mse") is None  # range 0.02, window 0.01
    assert zoom_range(_curves([2.0, 1.5]), "val/bpc") is None  # one arm
    assert zoom_range(_curves([2.0, 1.5], [2.0, 1.5]), "val/bpc") is None  # the finals equal the best
