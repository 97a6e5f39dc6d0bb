"""`bitplan formats`: the quantization formats with their bits, Gaussian MSE and distance to Shannon's bound."""
from __future__ import annotations

import json

import typer
from rich.table import Table

from . import add_name_column, app, console, print_table

KINDS = ("grid", "int", "sint", "uint", "ggml", "fp16")


@app.command("formats")
def formats_command(
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON instead of a table"),
    candidates: bool = typer.Option(False, "--candidates", help="only the solver's default candidates"),
    kind: str = typer.Option("", "--kind", help="only this kind: grid, int, sint, uint, ggml or fp16"),
    m: int = typer.Option(4096, "--m", help="out features of the layer used for storage bits per weight"),
    n: int = typer.Option(4096, "--n", help="in features of the layer used for storage bits per weight"),
) -> None:
    """List the quantization formats (storage bits per weight at an m×n layer, scales and seeds included)."""
    from ..errors import BitplanError
    from ..formats import all_formats, default_candidates
    from ..formats.registry import format_summary

    if kind and kind not in KINDS:
        raise BitplanError(f"unknown kind {kind!r}; choose {', '.join(KINDS)}")
    default = {f.name for f in default_candidates()}
    rows = [format_summary(f, m, n) | {"default_candidate": f.name in default}
            for f in (default_candidates() if candidates else all_formats())
            if (not kind or f.kind == kind) and f.applicable(m, n)]
    if json_out:
        console.print_json(json.dumps(rows))
        return
    print_table(formats_table(rows, m, n), console)


def formats_table(rows: list[dict], m: int, n: int) -> Table:
    table = Table(title=f"bitplan formats (bits per weight at a {m}×{n} layer; mse_q on i.i.d. N(0,1))",
                  caption="bits: nominal bits per weight (what --min-bits and --max-bits bound; for ggml's block "
                          "types, all they store); storage bpw: with scales, zeros and rotation seeds. sint and uint "
                          "(unrotated, integer zero points) are the integer formats vLLM runs. ggml types "
                          "whose block does not fit the row length are left out")
    add_name_column(table, "name")
    for col, just in [("kind", "left"), ("bits", "right"), ("storage bpw", "right"), ("mse_q", "right"),
                      ("÷ 4^-bits", "right"), ("default", "center")]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['nominal_bits']:.4g}", f"{r['bits_per_weight']:.4f}",
                      f"{r['mse_q']:.4g}", f"{r['shannon_ratio']:.3f}", "✓" if r["default_candidate"] else "")
    return table
