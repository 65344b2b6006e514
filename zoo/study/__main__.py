"""``python -m zoo.study <plan.yaml>`` runs a study; ``python -m zoo.study report <dir>`` writes its report.

python -m zoo.study configs/study/plan.yaml                  # run (or resume) every run of the plan
python -m zoo.study configs/study/plan.yaml --dry-run        # list the runs, their state and commands
python -m zoo.study configs/study/plan.yaml --only variants   # the runs of one experiment
python -m zoo.study report runs/study                        # runs/study/report.md and its plots
python -m zoo.study report runs/study --out docs/study.md    # the report elsewhere (plots in docs/study/)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.study.plan import PlanError, load_plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        parser = argparse.ArgumentParser(prog="python -m zoo.study report", description="Write a study's report.")
        parser.add_argument("dir", type=Path, help="the study's output directory (holding plan.yaml, results.csv)")
        parser.add_argument("--out", type=Path, default=None, help="the report's path (default: <dir>/report.md)")
        parser.add_argument("--notes", type=Path, default=None, help="a Markdown file of findings to put first")
        parser.add_argument(
            "--plan",
            default="configs/study/plan.yaml",
            help="the plan's path, as the report's reproduction command names it",
        )
        args = parser.parse_args(argv[1:])
        if args.notes is not None and not args.notes.is_file():
            parser.error(f"--notes: no file {args.notes}")
        from zoo.study.report import write_report

        path = write_report(args.dir, args.out, args.plan, args.notes)
        print(f"report: {path}")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m zoo.study",
        description="Run a study plan (resumable); 'python -m zoo.study report <dir>' writes its report.",
    )
    parser.add_argument("plan", type=Path, help="the plan (YAML), e.g. configs/study/plan.yaml")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the plan's out_dir)")
    parser.add_argument("--only", nargs="+", default=None, metavar="EXPERIMENT", help="run only these experiments")
    parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: the plan's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the plan's)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their state and commands; run nothing")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan, args.out)
        unknown = [e for e in args.only or [] if e not in plan.experiments]
        if unknown:
            known = ", ".join(plan.experiments)
            raise PlanError(f"--only: no experiment {', '.join(unknown)} in {args.plan} ({known})")
    except PlanError as err:
        parser.error(str(err))
    from zoo.study.runner import run_plan

    try:
        failed = run_plan(plan, args.only, args.workers, args.threads, args.dry_run)
    except KeyboardInterrupt:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
