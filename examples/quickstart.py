"""bitplan end to end on the default model: profile → solve → apply → eval, on a 2-core CPU in minutes.

    python examples/quickstart.py [--budget 3.25bpw] [--samples 64] [--windows 16] [--out runs/quickstart]

1. profile: Kronecker-factored Hessians of every block linear from State of the Union text (sotu.jsonl);
2. solve:   each layer's format under the budget, from the profile's held-out YAQA coefficients;
3. apply:   YAQA rounding per the plan into a packed checkpoint;
4. eval:    KL, top-1 agreement and perplexity against the original on WikiText-2 (text the method never saw),
            next to the best single format at the same budget with plain round-to-nearest.
Every step resumes where it stopped if the script is interrupted and run again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.apply import apply_formats, apply_plan
from bitplan.evaluate import evaluate
from bitplan.models import find_linears, load_model
from bitplan.profile import profile_model
from bitplan.solve import solve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Candidates whose per-layer error is quick to measure on a CPU (grids with p ≤ 2 and ≤ 256 points, integers);
# `bitplan profile` measures all of `bitplan formats` by default.
QUICK_FORMATS = ["higgs-p2-n16-g128", "higgs-p2-n32-g128", "higgs-p2-n64-g128", "higgs-p2-n128-g128",
                 "higgs-p2-n256-g128", "higgs-p1-n8-g128", "higgs-p1-n16-g128", "higgs-p1-n32-g128",
                 "higgs-p1-n64-g128", "int2-g128", "int3-g128", "int4-g128", "int5-g128", "int6-g128", "int8-g128",
                 "fp16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="3.25bpw")
    parser.add_argument("--calib", default=str(DATA / "sotu.jsonl"))
    parser.add_argument("--data", default=str(DATA / "wikitext2-test.raw"))
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    console = Console()
    out = Path(args.out)

    console.rule("[bold]1. profile")
    model = load_model(args.model)
    profile_model(model, args.calib, samples=args.samples, seqlen=256, out_dir=out / "profile", noise_samples=0,
                  formats=QUICK_FORMATS, judge_samples=0)   # quick: the halves' forecast alone

    console.rule("[bold]2. solve")
    plan = solve(out / "profile", args.budget)
    plan.save(out / "plan.json")
    console.print(f"plan: {plan.totals.get('storage_bpw', 0):.3f} storage bits per weight over the block linears; "
                  f"best uniform format at this budget: {plan.uniform['format'] if plan.uniform else 'none'}")

    console.rule("[bold]3. apply")
    apply_plan(out / "plan.json", out / "bitplan", model=model, rounding="yaqa")
    candidates = {"plan + YAQA": out / "bitplan"}
    if plan.uniform:
        uniform = {info.name: plan.uniform["format"] for info in find_linears(model.model)}
        apply_formats(model, uniform, out / "uniform-rtn", rounding="rtn")
        candidates[f"{plan.uniform['format']} RTN"] = out / "uniform-rtn"  # the best uniform format

    console.rule("[bold]4. eval")
    table = Table(title=f"{args.model} at {args.budget}, {args.windows} × 512 held-out tokens")
    for column in ("candidate", "KL ± se", "KL p99", "top-1", "ppl (orig.)"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for label, folder in candidates.items():
        r = evaluate(model, str(folder), args.data, windows=args.windows, seqlen=512)
        table.add_row(label, f"{r.kl_mean:.3f} ± {r.kl_se:.3f}", f"{r.kl_p99:.2f}", f"{100 * r.top1_agreement:.1f} %",
                      f"{r.ppl_candidate:.1f} ({r.ppl_reference:.1f})")
    console.print(table)


if __name__ == "__main__":
    main()
