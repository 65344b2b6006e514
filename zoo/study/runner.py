"""Run a study plan: every (task, arm, seed) through ``python -m zoo.cli fit`` (what train.py runs), resumably.

Each run writes its checkpoints and CSV logs to ``<out>/runs/<task>/<arm>/seed<k>``; when it ends, the runner reads
the logs into ``curve.csv`` (validation metrics and training seconds against steps) and ``result.json``, then writes
``<out>/results.csv`` (one row per experiment x run). A run with a ``result.json`` is never run again; one with a
``last.ckpt`` and no result resumes from it (``--ckpt_path last``), so killing the study and starting it again loses
at most the steps since the last validation.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from zoo.study.plan import Plan, Run, slug

# glibc's default malloc returns big buffers after every step and page-faults them back (benchmarks/speed.py)
TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
RESULT_FIELDS = ["experiment", "task", "arm", "seed", "status", "steps", "train_s", "wall_s", "monitor", "best_val"]

_children: set[subprocess.Popen] = set()
_lock = threading.Lock()
_stopping = threading.Event()  # set on interrupt: no new process starts


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.key


def fit_command(run: Run, out: Path, resume: bool) -> list[str]:
    """The ``zoo.cli fit`` command line of a run (resuming from its last checkpoint when ``resume``)."""
    cmd = [sys.executable, "-m", "zoo.cli", "fit", f"--config={run.config}", *run.args]
    cmd += [
        f"--seed_everything={run.seed}",
        f"--trainer.default_root_dir={out / 'runs'}",
        f"--name={run.key}",
        "--trainer.callbacks+=zoo.callbacks.TrainClock",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
    ]
    return cmd + (["--ckpt_path=last"] if resume else [])


def eval_command(run: Run, out: Path, label: str, overrides: tuple[str, ...], checkpoint: Path) -> list[str]:
    """The ``zoo.cli test`` command line that tests a run's best checkpoint with an eval's overrides."""
    return [
        sys.executable, "-m", "zoo.cli", "test", f"--config={run.config}", *run.args, *overrides,
        f"--seed_everything={run.seed}",
        f"--trainer.default_root_dir={out / 'runs'}",
        f"--name={run.key}/eval/{slug(label)}",
        "--trainer.enable_progress_bar=false",
        f"--ckpt_path={checkpoint}",
    ]  # fmt: skip


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if platform.libc_ver()[0] == "glibc":
        env.setdefault("GLIBC_TUNABLES", TUNABLES)
    return env


def _call(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run ``cmd`` with its output appended to ``log``; (exit status, wall seconds)."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        with _lock:
            if _stopping.is_set():
                return -signal.SIGTERM, 0.0
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            _children.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _lock:
                _children.discard(proc)
    return rc, time.perf_counter() - start


def read_metrics(log_root: Path) -> list[dict[str, str]]:
    """The rows of every ``version_*/metrics.csv`` under ``log_root``, oldest version first."""
    rows: list[dict[str, str]] = []
    versions = sorted(log_root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def curve(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """Validation points ``{"step", "train_s", "epoch", "val/...": ...}`` by optimizer step (``epoch``: the index of
    the epoch the validation ran in); a resumed run's later logs win."""
    points: dict[int, dict[str, float]] = {}
    for row in rows:
        vals = {k: float(v) for k, v in row.items() if k.startswith("val/") and v not in ("", None)}
        if not vals:
            continue
        step = int(row["step"]) + 1  # Lightning logs validation at the index of the step it follows
        point = points.setdefault(step, {"step": step})
        point.update(vals)
        if _float(row.get("time/train_s")) is not None:
            point["train_s"] = float(row["time/train_s"])
        if _float(row.get("epoch")) is not None:
            point["epoch"] = float(row["epoch"])
    return [points[s] for s in sorted(points)]


def last_test_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    """The last logged value of every ``test/*`` metric."""
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v not in ("", None)})
    return out


def monitor_of(config_path: Path) -> tuple[str, str]:
    """The validation metric a run's best checkpoint was chosen on (the config's ``checkpoint.monitor``, else the
    model's own), and whether lower (``min``) or higher (``max``) is better."""
    config = yaml.safe_load(config_path.read_text())
    checkpoint = config.get("checkpoint") or {}
    if checkpoint.get("monitor"):
        return checkpoint["monitor"], checkpoint.get("mode") or "min"
    module, _, name = config["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.monitor, cls.monitor_mode


def best_checkpoint(directory: Path) -> Path:
    """The best checkpoint of a finished run (the one ModelCheckpoint kept beside ``last.ckpt``)."""
    found = sorted(p for p in directory.glob("*.ckpt") if p.name != "last.ckpt")
    if len(found) != 1:
        raise RuntimeError(f"expected one best checkpoint in {directory}, found {[p.name for p in found]}")
    return found[0]


def write_curve(path: Path, points: list[dict[str, float]]) -> None:
    keys = ["step", "train_s", "epoch"] + sorted({k for p in points for k in p} - {"step", "train_s", "epoch"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(points)


def _failed(rdir: Path, error: str) -> dict[str, Any]:
    (rdir / "failed.txt").write_text(error + "\n")
    return {"status": "failed", "error": error}


def execute(run: Run, out: Path, threads: int) -> dict[str, Any]:
    """Run (or resume, or skip) one run and its evals; return its result (``status`` "done" or "failed").

    ``result.json`` is written when the fit ends and again after each eval, so a restart redoes only what is missing.
    """
    rdir = run_dir(out, run)
    result_path = rdir / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if all(label in result.get("evals", {}) for label, _ in run.evals):
            return result
    else:
        result = None
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "failed.txt").unlink(missing_ok=True)
    env = child_env(threads)
    log = rdir / "log.txt"
    if result is None:
        resume = (rdir / "checkpoints" / "last.ckpt").exists()
        rc, wall = _call(fit_command(run, out, resume), log, env)
        spent = rdir / "wall_s.txt"  # the wall time of every attempt, summed
        total = wall + (float(spent.read_text()) if spent.exists() else 0.0)
        spent.write_text(f"{total:.3f}")
        if rc != 0:
            return _failed(rdir, f"fit exited with {rc}; see {log}")
        rows = read_metrics(rdir)
        if not last_test_metrics(rows):  # no test metrics logged: the fit did not finish
            return _failed(rdir, f"fit ended without its test (stopped early?); see {log}")
        points = curve(rows)
        write_curve(rdir / "curve.csv", points)
        configs = sorted(rdir.glob("version_*/config.yaml"))
        monitor, mode = monitor_of(configs[-1])
        values = [p[monitor] for p in points if monitor in p]
        best = (min if mode == "min" else max)(values) if values else None
        result = {
            "status": "done",
            "task": run.task,
            "arm": run.arm,
            "seed": run.seed,
            "steps": points[-1]["step"] if points else 0,
            "train_s": points[-1].get("train_s") if points else None,
            "wall_s": round(total, 3),
            "monitor": monitor,
            "mode": mode,
            "best_val": best,
            "test": last_test_metrics(rows),
            "evals": {},
        }
        result_path.write_text(json.dumps(result, indent=1))  # the fit is done; evals may follow
    for label, overrides in run.evals:
        if label in result["evals"]:
            continue
        edir = rdir / "eval" / slug(label)
        if edir.exists():
            shutil.rmtree(edir)  # an interrupted eval starts over
        cmd = eval_command(run, out, label, overrides, best_checkpoint(rdir / "checkpoints"))
        rc, _ = _call(cmd, log, env)
        if rc != 0:
            return _failed(rdir, f"eval {label!r} exited with {rc}; see {log}")
        result["evals"][label] = last_test_metrics(read_metrics(edir))
        result_path.write_text(json.dumps(result, indent=1))
    return result


def result_rows(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """One row per experiment x run of the plan, from the runs' ``result.json``: status "done" (fit and evals),
    "failed" (the last attempt failed) or "pending"; the metrics known so far."""
    rows = []
    for exp in plan.experiments.values():
        for run in plan.experiment_runs(exp):
            path = run_dir(out, run) / "result.json"
            row: dict[str, Any] = {"experiment": exp.name, "task": run.task, "arm": run.arm, "seed": run.seed}
            status = "done" if finished(out, run) else "failed" if (path.parent / "failed.txt").exists() else "pending"
            if path.exists():
                result = json.loads(path.read_text())
                row.update({k: result.get(k) for k in RESULT_FIELDS if k not in row})
                row["run_dir"] = str(Path("runs") / run.key)
                row.update(result.get("test", {}))
                for label, metrics in result.get("evals", {}).items():
                    row.update({f"{label}: {k}": v for k, v in metrics.items()})
            rows.append({**row, "status": status})
    return rows


def write_results(plan: Plan, out: Path) -> Path:
    """(Re)write ``<out>/results.csv`` from the runs on disk."""
    rows = result_rows(plan, out)
    extra = sorted({k for r in rows for k in r} - set(RESULT_FIELDS) - {"run_dir"})
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RESULT_FIELDS, *extra, "run_dir"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def environment(workers: int, threads: int) -> dict[str, Any]:
    """What ran the study: machine, software, parallelism, code version (for the report's "How this was made")."""
    import torch

    from zoo.nn.fused import extension_available

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        version = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        version = None
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "workers": workers,
        "threads": threads,
        "malloc": child_env(threads).get("GLIBC_TUNABLES"),
        "lstm_step_extension": extension_available(),
        "commit": version,
    }


def _stop_children() -> None:
    with _lock:
        _stopping.set()
        for proc in _children:
            proc.terminate()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def finished(out: Path, run: Run) -> bool:
    """Whether a run and all its evals are done."""
    path = run_dir(out, run) / "result.json"
    return path.exists() and all(label in json.loads(path.read_text()).get("evals", {}) for label, _ in run.evals)


def run_plan(
    plan: Plan,
    experiments: list[str] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    dry_run: bool = False,
) -> int:
    """Run every pending run of the plan (``workers`` at a time, ``threads`` torch threads each) and write
    ``results.csv``; return the number of failed runs. ``dry_run``: print each run's state and command only."""
    out = plan.out_dir
    runs = plan.runs(experiments)
    workers = workers or plan.workers
    threads = threads or plan.threads
    if dry_run:
        for run in runs:
            rdir = run_dir(out, run)
            resumable = (rdir / "checkpoints" / "last.ckpt").exists()
            state = "done" if finished(out, run) else "resume" if resumable else "pending"
            print(f"{state:8s} {run.key}: python {shlex.join(fit_command(run, out, state == 'resume')[1:])}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.yaml").write_text(yaml.safe_dump(plan.raw, sort_keys=False))
    todo = [r for r in runs if not finished(out, r)]
    if todo:  # every session that runs something is recorded
        env_path = out / "environment.json"
        sessions = json.loads(env_path.read_text()) if env_path.exists() else []
        env_path.write_text(json.dumps([*sessions, environment(workers, threads)], indent=1))
    print(f"study {plan.title!r}: {len(runs)} runs, {len(runs) - len(todo)} finished; results in {out}", flush=True)
    failed = 0
    _stopping.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(todo), desc="runs", unit="run") as bar:
            futures = {pool.submit(execute, run, out, threads): run for run in todo}
            for future in as_completed(futures):
                run = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # a broken run must not stop the others
                    result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
                bar.update()
                if result["status"] != "done":
                    failed += 1
                    tqdm.write(f"FAILED {run.key}: {result['error']}")
                    continue
                metric = plan.tasks[run.task].metric
                score = result["test"].get(metric or "")
                summary = f"done   {run.key}: {result['steps']} steps, {result['train_s'] or 0:.0f} s training"
                tqdm.write(summary + (f", {metric} {score:.4f}" if score is not None else ""))
                write_results(plan, out)
    except KeyboardInterrupt:
        _stop_children()
        pool.shutdown(wait=True, cancel_futures=True)
        print("interrupted: run the same command again to resume", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    path = write_results(plan, out)
    print(f"results: {path}" + (f" ({failed} failed)" if failed else ""))
    return failed
