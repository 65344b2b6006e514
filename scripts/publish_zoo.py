"""Publish the converged zoo's finished runs (configs/zoo/plan.yaml) into the package's hub (zoo/hub/models, manifest).

    python scripts/publish_zoo.py                       # every finished seed-0 run not yet published
    python scripts/publish_zoo.py --tasks ett ucr       # only these tasks
    python scripts/publish_zoo.py --force               # export again what is already published

Each run's best checkpoint is exported (`zoo.hub.export`: the weights, the config, a card whose metrics are measured
again on the published files, with the validation curve's end as proof of convergence) and recorded in the manifest
(`zoo.hub.push`). The model is named ``<prefix>-<variant>`` (the prefixes below); the training time on the card is the
run's whole training time (its TrainClock), the command the one that reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from zoo.hub.publish import describe_hardware, export, push
from zoo.hub.sources import MANIFEST, read_manifest
from zoo.study.plan import load_plan
from zoo.study.runner import best_checkpoint, finished, run_dir

PREFIX = {"ucr": "italypower", "ett": "etth1", "shakespeare": "shakespeare", "ptb_char": "ptb_char"}
MODELS = MANIFEST.parent / "models"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="configs/zoo/plan.yaml")
    parser.add_argument("--out", type=Path, default=None, help="the study's output directory (default: the plan's)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all)")
    parser.add_argument("--force", action="store_true", help="export again what is already in the manifest")
    args = parser.parse_args()
    plan = load_plan(args.plan, args.out)
    published = read_manifest(MANIFEST)
    done = []
    for run in plan.runs():
        if run.seed != 0 or run.task not in PREFIX or (args.tasks and run.task not in args.tasks):
            continue
        variant = dict(a.split("=", 1) for a in run.args)["--model.init_args.variant"]
        name = f"{PREFIX[run.task]}-{variant}"
        if not finished(plan.out_dir, run) or (name in published and not args.force):
            continue
        rdir = run_dir(plan.out_dir, run)
        result = json.loads((rdir / "result.json").read_text())
        command = f"python train.py fit --config {run.config} --model.init_args.variant {variant} --seed_everything 0"
        with tempfile.TemporaryDirectory() as tmp:
            card = export(
                best_checkpoint(rdir / "checkpoints"),
                tmp,
                name=name,
                command=command,
                training_time_s=result.get("train_s"),
                hardware=f"{describe_hardware()}; {plan.threads} thread(s) per run, {plan.workers} runs at a time",
            )
            target = MODELS / name
            if target.exists():
                shutil.rmtree(target)
            push(tmp, str(target), manifest=MANIFEST)
        done.append(name)
        print(f"published {name}: {card.metric} {card.value:.4f}; {card.convergence}", flush=True)
    print(f"{len(done)} published")
    return 0


if __name__ == "__main__":
    sys.exit(main())
