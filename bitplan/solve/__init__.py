"""Exact bit allocation under a budget: a format for every block linear layer, minimizing predicted ΔKL.

    from bitplan.solve import solve, load_plan
    plan = solve("profiles/smollm2-135m", "3.25bpw")           # or 2.1GB, 1.8GiB, 700MiB
    plan.save("plan.json"); plan = load_plan("plan.json")      # load_plan re-checks hand-edited plans
"""
from .api import best_uniform, solve
from .budget import Budget, parse_budget, parse_sweep
from .plan import LayerPlan, Plan, load_plan, rounding_for, rounding_note
from .problem import Resource, load_resource
from .sweep import SweepRow, sweep

__all__ = ["Budget", "LayerPlan", "Plan", "Resource", "SweepRow", "best_uniform", "load_plan", "load_resource",
           "parse_budget", "parse_sweep", "rounding_for", "rounding_note", "solve", "sweep"]
