"""`bitplan solve`: choose a format for every block linear layer (and the embedding and head) under a budget, and
explain the choice."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import add_name_column, app, console, print_table

_ROUNDING_WORDS = {"yaqa": "YAQA (two-sided LDLQ)", "ldlq": "one-sided LDLQ (GPTQ)", "rtn": "round-to-nearest"}
_BPW_STYLE = [(2.5, "red"), (3.5, "yellow"), (5.0, "green"), (99.0, "cyan")]


@app.command("solve")
def solve_command(
    profile: str = typer.Argument(..., help="profile directory (or its profile.json) from `bitplan profile`"),
    budget: Optional[str] = typer.Option(None, "--budget", "-b",
                                         help="3.25bpw (storage bits per weight over block linears; over every "
                                              "planned weight with --scope all), or a whole-file size: 2.1GB, "
                                              "1.8GiB, 500MB, 700MiB, 93510432B"),
    scope: Optional[str] = typer.Option(None, "--scope",
                                        help="all (the token embedding and an untied head are planned like any "
                                             "layer) or blocks (they stay fp16 unless pinned) (default: all for a "
                                             "file-size budget, blocks for bpw)"),
    out: str = typer.Option("plan.json", "--out", "-o", help="where to write the plan (and sweep files); a folder "
                                                               "(existing, or ending in /) gets plan.json"),
    solver: str = typer.Option("dp", "--solver", help="dp (exact dynamic program) or ilp (CBC; exact codebooks, "
                                                      "needed for --resource)"),
    objective: Optional[str] = typer.Option(None, "--objective",
                                            help="yaqa (after YAQA rounding, judged on the model's own samples when "
                                                 "the profile has a judge), yaqa-halves (judged on the calibration "
                                                 "halves), hessian or noise (for round-to-nearest), ldlq (for "
                                                 "--rounding ldlq) (default: the best the profile has)"),
    formats: Optional[str] = typer.Option(None, "--formats",
                                          help="comma list of format names and sets: profile (default), default, "
                                               "all, grid, int, kernel, ggml, vllm"),
    runtime: str = typer.Option("any", "--runtime",
                                help="any (bitplan's own loader) or vllm: only formats vLLM runs (default menu "
                                     "vllm), q/k/v and gate/up tied, embedding and head fp16; the plan records it "
                                     "and the compressed-tensors export checks it"),
    pin: List[str] = typer.Option([], "--pin", help="REGEX=FORMAT: layers whose name matches get FORMAT "
                                                    "(repeatable)"),
    min_bits: Optional[float] = typer.Option(None, "--min-bits", help="lowest nominal bits per weight of any layer"),
    max_bits: Optional[float] = typer.Option(None, "--max-bits", help="highest nominal bits per weight of any layer"),
    tie: Optional[str] = typer.Option(None, "--tie", help="layers sharing one format: comma list of qkv, gateup, "
                                                          "attn, mlp, block"),
    resource: Optional[Path] = typer.Option(None, "--resource", help="second resource table (JSON or CSV: format, "
                                                                     "amount per weight); needs --solver ilp"),
    resource_limit: Optional[float] = typer.Option(None, "--resource-limit",
                                                   help="limit on the resource's mean per weight"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="e.g. 2.5:4.5:0.25 (start, stop, step in bpw): Pareto "
                                                              "table (CSV), plot (PNG) and a plan per budget "
                                                              "(plan-3.25bpw.json) next to -o"),
    resolution: float = typer.Option(1e-6, "--resolution", help="DP cell size in bits per weight"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="ILP time limit in seconds "
                                                                          "(default 60)"),
    top: int = typer.Option(8, "--top", help="how many of the largest predicted-ΔKL layers to list"),
) -> None:
    """Allocate bits: minimize predicted ΔKL within a budget; writes plan.json."""
    from ..errors import BitplanError
    from ..io import check_writable
    from ..solve import parse_sweep, rounding_note, solve
    from ..solve import sweep as run_sweep
    from ..solve.sweep import plan_out, plot_sweep, sweep_paths, write_sweep_csv, write_sweep_plans

    if budget is None and sweep is None:
        raise BitplanError("give a --budget (e.g. 3.25bpw or 2.1GB) or a --sweep A:B:STEP")
    out = plan_out(out)
    check_writable(out, "file", "plan file")
    if sweep is not None:
        for path in sweep_paths(out):
            check_writable(path, "file", "sweep file")
    kwargs = dict(solver=solver, objective=objective, formats=formats, pins=pin, min_bits=min_bits,
                  max_bits=max_bits, tie=tie, resource=resource, resource_limit=resource_limit,
                  resolution=resolution, time_limit=time_limit, scope=scope, runtime=runtime)
    if sweep is not None:
        budgets = parse_sweep(sweep)
        rows, used_objective = run_sweep(profile, budgets, **kwargs)
        csv_path, png_path = sweep_paths(out)
        plans = write_sweep_plans(rows, out)
        write_sweep_csv(rows, csv_path)
        plot_sweep(rows, png_path, title=f"{Path(profile).name}: predicted ΔKL ({used_objective}) vs size")
        print_table(sweep_table(rows, used_objective), console)
        console.print(f"[dim]wrote {csv_path}, {png_path} and {len(plans)} plans"
                      + (f": {plans[0]} … {plans[-1].name}" if len(plans) > 1 else
                         f": {plans[0]}" if plans else "") + "[/]")
        first = next((r.plan for r in rows if r.plan is not None), None)
        note = rounding_note(first) if first is not None and budget is None else None
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if budget is not None:
        plan = solve(profile, budget, **kwargs)
        plan.save(out)
        print_plan(plan, objective is None, top)
        console.print(f"[dim]wrote {out}[/]")
        note = rounding_note(plan)
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _style(bpw: float) -> str:
    return next(s for limit, s in _BPW_STYLE if bpw < limit)


def print_plan(plan, defaulted: bool, top: int) -> None:
    from ..solve import report

    t, s = plan.totals, plan.solver
    how = "the best coefficient this profile has" if defaulted else "as asked"
    coefficient = f": {plan.coefficient}" if plan.coefficient else ""
    gap = s.get("gap_to_lower_bound")
    proof = ("" if s.get("optimal") else f" (proven within {100 * gap:.2g} % of the optimum)" if gap is not None
             else " (not proven optimal)")
    console.print(f"objective [bold]{plan.objective}[/]{coefficient} ({how}); solver {s['name']}{proof} in "
                  f"{s.get('seconds', 0):.2f} s; "
                  f"budget {plan.budget['given']} = {plan.budget['resolved']}")
    console.print(f"scope [bold]{plan.scope}[/]: " + (
        "the embedding and head are planned like any layer" if plan.scope == "all" else
        "the block linears are planned; the embedding and head stay fp16 unless pinned"))
    if plan.runtime != "any":
        console.print(f"runtime [bold]{plan.runtime}[/]: only formats it runs, q/k/v and gate/up tied per block")
    console.print(f"rounding [bold]{plan.rounding}[/]: the plan's predicted ΔKL is for "
                  f"{_ROUNDING_WORDS[plan.rounding]}; "
                  "`bitplan apply` rounds with it unless given --rounding")

    kinds = Table(title="formats by projection kind")
    for col, just in (("kind", "left"), ("layers", "right"), ("bpw", "right")):
        kinds.add_column(col, justify=just)
    add_name_column(kinds, "formats (count)")
    kinds.add_column("predicted ΔKL", justify="right")
    for row in report.by_kind(plan):
        fmts = [f"{name} ×{n}" for name, n in row.formats[:4]]
        if len(row.formats) > 4:
            fmts.append(f"… {len(row.formats) - 4} more")
        kinds.add_row(row.kind, str(row.layers), f"[{_style(row.bpw)}]{row.bpw:.3f}[/]", "\n".join(fmts),
                      "–" if row.predicted_dkl is None else f"{row.predicted_dkl:.4g}")
    print_table(kinds, console)

    labels, kind_names, grid = report.by_depth(plan)
    depth = Table(title="storage bits per weight by depth (blocks) and kind")
    depth.add_column("blocks")
    for k in kind_names:
        depth.add_column(k, justify="right")
    for label, row in zip(labels, grid):
        depth.add_row(label, *("" if v is None else f"[{_style(v)}]{v:.2f}[/]" for v in row))
    print_table(depth, console)

    total = t["predicted_dkl"] or 0.0
    worst = Table(title=f"largest predicted ΔKL (top {top}; %: share of the plan's)")
    add_name_column(worst, "layer")
    add_name_column(worst, "format")
    for col in ("bpw", "predicted ΔKL", "%"):
        worst.add_column(col, justify="right")
    for lp in report.top_layers(plan, top):
        share = f"{100 * lp.predicted_dkl / total:.1f}" if total else "–"
        worst.add_row(lp.name, lp.format, f"{lp.bpw:.2f}", f"{lp.predicted_dkl:.4g}", share)
    print_table(worst, console)

    outer = [lp for lp in plan.layers if lp.outer]
    held = ", ".join(f"{lp.kind} {lp.format} {lp.storage_bits // 8:,} bytes" + (" (tied head)" if lp.ties else "")
                     for lp in outer)
    console.print(f"totals: block linears nominal {t['nominal_bpw']:.4f} bpw, storage {t['storage_bpw']:.4f} bpw "
                  f"(codebooks {t['codebook_bits']:,} bits), file {t['total_bytes']:,} bytes ("
                  + (f"{held}; other tensors fp16: {t['extras_bits'] // 8:,} bytes)" if outer else
                     f"embedding/head fp16: {t['extras_bits'] // 8:,} bytes)"))
    console.print(report.comparison(plan))


def sweep_table(rows, objective: str) -> Table:
    table = Table(title=f"Pareto sweep (predicted ΔKL, objective {objective}; bpw: storage)")
    for col in ("budget bpw", "plan bpw", "plan ΔKL"):
        table.add_column(col, justify="right")
    add_name_column(table, "best uniform")
    for col in ("uniform bpw", "uniform ΔKL", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        if r.predicted_dkl is None:
            table.add_row(f"{r.budget_bpw:g}", "–", "–", "[dim]infeasible[/]", "", "", "")
            continue
        ratio = f"{r.uniform_dkl / r.predicted_dkl:.2f}×" if r.uniform_dkl and r.predicted_dkl else ""
        table.add_row(f"{r.budget_bpw:g}", f"{r.storage_bpw:.4f}", f"{r.predicted_dkl:.4g}", r.uniform_format or "–",
                      "" if r.uniform_bpw is None else f"{r.uniform_bpw:.4f}",
                      "" if r.uniform_dkl is None else f"{r.uniform_dkl:.4g}", ratio)
    return table
