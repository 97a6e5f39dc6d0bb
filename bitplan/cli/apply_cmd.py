"""`bitplan apply`: round a model into its plan's formats and write a packed checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..data import DEFAULT_EVALUATION
from . import add_name_column, app, console, print_table


@app.command("apply")
def apply_command(
    plan: Path = typer.Argument(..., help="plan.json from `bitplan solve`"),
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to write"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the model (default: the one the plan names)"),
    rounding: Optional[str] = typer.Option(None, "--rounding", show_default=False,
                                           help="yaqa (two-sided LDLQ), ldlq (one-sided, GPTQ) or rtn (default: the "
                                                "rounding the plan was solved for)"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="profile folder with hessians/ (default: the plan's)"),
    shrink: str = typer.Option("auto", "--shrink", help="auto (λ of H_O and of H_I per layer, chosen on the profile's "
                               "held-out half) or one λ in [0, 1] for H_O: H_O ← (1−λ)·H_O + λ·T after "
                               "normalization (YAQA only)"),
    shrink_target: str = typer.Option("identity", "--shrink-target", help="T: identity, or diagonal (the factor's "
                                      "own diagonal in the original basis)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="layers rounded in parallel (default: one per core)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a checkpoint already in --out (only the files "
                                   "bitplan wrote there; other files in the folder are kept)"),
    strict: bool = typer.Option(False, "--strict", help="refuse a plan over its own budget (e.g. edited by hand) "
                                "instead of applying it with a warning"),
    device: str = typer.Option("auto", "--device", help="where the rounding runs (factor preparation, block LDL, "
                               "error feedback): auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="the dtype each layer's weight is taken in before the "
                              "rounding upcasts it: auto (the checkpoint's on a GPU, float32 on the CPU), "
                              "float32, bfloat16 or float16"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resource plan (memory per process, disk, time "
                                 "as a multiple of one forward+backward) from the model's config.json and stop"),
) -> None:
    """Quantize a model per its plan (with the rounding it was solved for, by default) into a packed checkpoint."""
    if dry_run:
        from ..resources import apply_job, plan_table

        job, refusal = apply_job(plan, model=model, rounding=rounding, profile_dir=profile, workers=workers,
                                 device=device, dtype=dtype, shrink=shrink, shrink_target=shrink_target)
        print_table(plan_table(job), console)
        if refusal:
            console.print(f"[yellow]would not fit: {refusal}[/]", soft_wrap=True)
        return
    from ..apply import apply_plan

    from ..distributed import Ranks

    result = apply_plan(plan, out, model=model, rounding=rounding, profile_dir=profile, shrink=shrink,
                        shrink_target=shrink_target, workers=workers, overwrite=overwrite, strict=strict,
                        device=device, dtype=dtype)
    if not Ranks.current().main:  # under torchrun, rank 0 assembles the checkpoint and reports
        return
    table = Table(title=f"{len(result.formats)} layers → {result.out_dir}")
    add_name_column(table, "format")
    for column in ("layers", "mean t²", "mean λ of H_O", "mean λ of H_I"):
        table.add_column(column, justify="right")
    by_format: dict[str, list[dict]] = {}
    for name, fmt in result.formats.items():
        by_format.setdefault(fmt, []).append(result.stats[name])
    for fmt, stats in sorted(by_format.items()):
        errs = [s.get("rel_err", float("nan")) for s in stats]
        lams = {side: sum(float(s.get(side, 0.0)) for s in stats) / len(stats) for side in ("shrink_out", "shrink_in")}
        table.add_row(fmt, str(len(stats)), f"{sum(errs) / len(errs):.5f}",
                      *(f"{lams[side]:.2f}" if all(s.get("rounding") == "yaqa" for s in stats) else "–"
                        for side in ("shrink_out", "shrink_in")))
    print_table(table, console)
    console.print(f"evaluate it: bitplan eval --reference {model or 'MODEL'} --candidate {result.out_dir}"
                  f" (held-out text: --data, default {DEFAULT_EVALUATION})")
