"""`--sweep`: plans at a range of bpw budgets, as a Pareto table (CSV) and a plot against the best uniform format."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

from ..errors import BitplanError
from ..io import atomic_path, write_text
from ..profile.schema import Profile
from .api import DEFAULT_RESOLUTION, SOLVERS, _load, _resource, best_uniform, make_plan, resolve_budget, run_solver
from .budget import Budget
from .plan import Plan
from .problem import build_instance, resolve_scope


@dataclass
class SweepRow:
    budget_bpw: float
    storage_bpw: float | None
    predicted_dkl: float | None
    uniform_format: str | None
    uniform_bpw: float | None
    uniform_dkl: float | None
    note: str = ""
    plan_file: str = ""                                    # where `write_sweep_plans` saved the plan
    plan: Plan | None = field(default=None, repr=False)     # None for an infeasible budget; not a CSV column

    def csv_row(self) -> dict:
        return {f: ("" if getattr(self, f) is None else getattr(self, f)) for f in CSV_FIELDS}


def sweep(profile: Profile | str | Path, budgets, solver: str = "dp", objective: str | None = None, formats=None,
          pins=(), min_bits: float | None = None, max_bits: float | None = None, tie=None, resource=None,
          resource_limit: float | None = None, resolution: float = DEFAULT_RESOLUTION,
          time_limit: float | None = None, scope: str | None = None,
          runtime: str = "any") -> tuple[list[SweepRow], str]:
    """Solve at each bpw budget with one instance built once; an infeasible budget gets a row with a note.
    `scope` and `runtime` as in `solve` (default `blocks`: bpw over the block linears).

    Returns the rows and the objective used."""
    if solver not in SOLVERS:
        raise BitplanError(f"unknown solver {solver!r}; choose dp or ilp")
    prof, identity = _load(profile)
    inst = build_instance(prof, objective, formats, pins, min_bits, max_bits, tie, _resource(resource, resource_limit),
                          scope=resolve_scope(prof, scope, "bpw", runtime), runtime=runtime)
    rows = []
    for value in budgets:
        value = Fraction(value)
        b = Budget(f"{float(value):g}bpw", "bpw", value)
        try:
            target = resolve_budget(inst, b)
            sol = run_solver(inst, target.layer_bits, solver, resolution, time_limit)
        except BitplanError as e:
            rows.append(SweepRow(float(value), None, None, None, None, None, note=str(e)))
            continue
        uni = best_uniform(inst, target.layer_bits)
        rows.append(SweepRow(float(value), inst.bpw_bits(sol.bits), sol.cost,
                             uni["format"] if uni else None, uni["storage_bpw"] if uni else None,
                             uni["predicted_dkl"] if uni else None,
                             plan=make_plan(inst, sol, target, solver, identity)))
    return rows, inst.objective


CSV_FIELDS = [f.name for f in fields(SweepRow) if f.name != "plan"]


def plan_out(out: str | Path) -> Path:
    """Where `solve -o OUT` writes its plan: OUT, or OUT/plan.json when OUT is a folder (existing, or written
    with a trailing slash), so that `--sweep … -o sweep/` fills that folder."""
    text = str(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / "plan.json"
    return Path(text)


def sweep_paths(out: str | Path) -> tuple[Path, Path]:
    """`plan.json` → `plan-sweep.csv`, `plan-sweep.png` next to it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return stem.with_name(stem.name + "-sweep.csv"), stem.with_name(stem.name + "-sweep.png")


def sweep_plan_path(out: str | Path, budget_bpw: float) -> Path:
    """`plan.json` at 3.25 bpw → `plan-3.25bpw.json` next to it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return stem.with_name(f"{stem.name}-{budget_bpw:g}bpw.json")


def write_sweep_plans(rows: list[SweepRow], out: str | Path) -> list[Path]:
    """Save the plan of every feasible budget next to `out` (`sweep_plan_path`); records each row's plan_file."""
    written = []
    for r in rows:
        if r.plan is not None:
            path = sweep_plan_path(out, r.budget_bpw)
            r.plan.save(path)
            r.plan_file = path.name
            written.append(path)
    return written


def write_sweep_csv(rows: list[SweepRow], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.csv_row())
    write_text(path, buf.getvalue())


def plot_sweep(rows: list[SweepRow], path: str | Path, title: str = "") -> None:
    """Predicted ΔKL (log scale) against storage bpw: the plan at each budget and the best uniform format."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    plan = [(r.storage_bpw, r.predicted_dkl) for r in rows if r.predicted_dkl is not None and r.predicted_dkl > 0]
    uni = sorted({(r.uniform_bpw, r.uniform_dkl, r.uniform_format) for r in rows
                  if r.uniform_dkl is not None and r.uniform_dkl > 0})
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if plan:
        ax.plot(*zip(*plan), "o-", label="bitplan (mixed formats)")
    if uni:
        ax.plot([u[0] for u in uni], [u[1] for u in uni], "s--", label="best uniform format")
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per weight (block linears)")
    ax.set_ylabel("predicted ΔKL (nats / token)")
    ax.set_title(title or "predicted ΔKL against size")
    ax.grid(True, which="both", alpha=0.3)
    if plan or uni:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
