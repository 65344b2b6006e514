"""Studies: a grid of (task x arm x seed) training runs with equal budgets, and their report."""

from zoo.study.plan import Plan, PlanError, Run, load_plan

__all__ = ["Plan", "PlanError", "Run", "load_plan"]
