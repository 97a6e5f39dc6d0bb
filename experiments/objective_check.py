"""Which coefficient should the solver spend the bits by? One budget, one plan per objective, each rounded one way.

    python experiments/objective_check.py --profile p256 --budget 3.25bpw --windows 32 [--rounding yaqa|ldlq|rtn]

The profile (a finished one with hessians/ and its judge) is solved at the budget with each objective:

  yaqa (halves)    `--objective yaqa-halves`: α_shaped × the cross-fitted YAQA gain (calibration half a ↔ b)
  yaqa (samples)   `--objective yaqa`, the default: the judge's α_shaped (the model's own samples) × the gain
                   judged under their factors
  hessian          `--objective hessian`: α_hessian, round-to-nearest's coefficient (no credit for adaptive rounding)
  ldlq             `--objective ldlq`: the judge's α_shaped × one-sided LDLQ's gain judged under the samples' factors

Each plan is rounded with `apply`'s defaults (YAQA, `--shrink auto`), or as `--rounding` says, and evaluated on
WikiText-2 (text the profile never saw) against the original model. The table prints each plan's storage bpw,
its predicted ΔKL (the sum of its layers' α × t²), the measured mean KL ± its standard error, and measured ÷
predicted. Rows are kept in OUT/results.json as they finish; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.apply import apply_formats  # noqa: E402
from bitplan.data import DEFAULT_EVALUATION  # noqa: E402
from bitplan.evaluate import evaluate  # noqa: E402
from bitplan.io import read_json, write_json  # noqa: E402
from bitplan.models import load_model  # noqa: E402
from bitplan.solve import solve  # noqa: E402



def row_key(label: str, args) -> str:
    """results.json's key of a row; YAQA's rows keep the keys they had before --rounding existed."""
    key = f"{label} @ {args.budget}, {args.windows} windows"
    return key if args.rounding == "yaqa" else f"{key}, {args.rounding}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", type=Path, required=True, help="a finished profile with hessians/ and a judge")
    parser.add_argument("--budget", default="3.25bpw")
    parser.add_argument("--data", default=DEFAULT_EVALUATION)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--rounding", default="yaqa", choices=["yaqa", "ldlq", "rtn"],
                        help="how every plan is rounded (which objective suits which rounding)")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=140)   # a log file gets the whole table
    lm = load_model(args.model)
    variants = {"yaqa (halves)": "yaqa-halves", "yaqa (samples)": "yaqa", "hessian": "hessian", "ldlq": "ldlq"}
    results_path = args.out / "results.json"
    results = read_json(results_path, "results") if results_path.is_file() else {}
    plans = {}
    for label, objective in variants.items():
        plans[label] = plan = solve(args.profile, args.budget, objective=objective)
        if label == "yaqa (samples)" and plan.coefficient != "alpha_yaqa_judged":
            raise SystemExit(f"{args.profile} has no judge: profile it with --judge-samples 64")
        key = row_key(label, args)
        if key in results:
            continue
        console.rule(f"[bold]{label}")
        ckpt = args.out / label.replace(" ", "_").replace("(", "").replace(")", "")
        apply_formats(lm, plan.formats, ckpt, rounding=args.rounding, profile_dir=args.profile,
                      overwrite=True)
        r = evaluate(lm, str(ckpt), args.data, windows=args.windows, seqlen=512)
        results[key] = {"storage_bpw": plan.totals["storage_bpw"], "predicted": plan.totals["predicted_dkl"],
                        "kl": r.kl_mean, "kl_se": r.kl_se, "top1": r.top1_agreement, "ppl": r.ppl_candidate}
        write_json(results_path, results)
        shutil.rmtree(ckpt, ignore_errors=True)

    base = plans["yaqa (halves)"].formats
    table = Table(title=f"{args.model}: one plan per objective at {args.budget}, {args.rounding} rounding, "
                        f"{args.windows} × 512 tokens of {Path(args.data).name}")
    for col in ("objective", "bpw", "layers unlike halves'", "predicted ΔKL", "KL ± se", "measured ÷ predicted",
                "top-1", "ppl"):
        table.add_column(col, justify="left" if col == "objective" else "right")
    for label, plan in plans.items():
        r = results[row_key(label, args)]
        differ = sum(plan.formats[n] != base[n] for n in base)
        table.add_row(label, f"{r['storage_bpw']:.3f}", str(differ), f"{r['predicted']:.4f}",
                      f"{r['kl']:.4f} ± {r['kl_se']:.4f}", f"{r['kl'] / r['predicted']:.2f}",
                      f"{100 * r['top1']:.1f} %", f"{r['ppl']:.2f}")
    console.print(table)
    console.print("predicted ΔKL is each plan's own objective summed over its layers, so only the measured KL "
                  "compares the plans")


if __name__ == "__main__":
    main()
