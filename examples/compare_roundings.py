"""What each part of bitplan buys, at one storage budget on the default model: allocation × rounding.

    python examples/compare_roundings.py [--profile DIR] [--budget 3.25bpw] [--windows 32] [--out runs/compare]

Without --profile it first runs `bitplan profile` with its defaults on the built-in text sotu (about half an hour on two
cores); pass a finished profile folder with hessians/ to skip that. Then it solves the budget and writes and
evaluates six checkpoints on WikiText-2 (text the profile never saw), against the original model:

  plan + YAQA            the full pipeline: the solver's per-layer formats, two-sided adaptive rounding
  uniform + YAQA         the best single format that fits the budget, same rounding
  uniform + LDLQ         … with one-sided LDLQ (GPTQ's update, H_I = Σxxᵀ)
  uniform + RTN          … with round-to-nearest
  plan + RTN             the solver's formats with round-to-nearest
  int4-g128 + RTN        the familiar 4-bit baseline, at 4.25 bits per weight (more than the budget)

Every row is kept in OUT/results.json as it finishes; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.apply import apply_formats
from bitplan.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from bitplan.evaluate import evaluate
from bitplan.formats import get_format
from bitplan.io import read_json, write_json
from bitplan.models import find_linears, load_model
from bitplan.profile import profile_model
from bitplan.solve import solve


def storage_bpw(infos, formats: dict[str, str]) -> float:
    """Stored bits (codes, scales, everything) per weight over the block linears."""
    bits = sum(get_format(formats[i.name]).storage_bits(i.out_features, i.in_features) for i in infos)
    return bits / sum(i.out_features * i.in_features for i in infos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", type=Path, help="a finished profile folder with hessians/")
    parser.add_argument("--budget", default="3.25bpw")
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION)
    parser.add_argument("--data", default=DEFAULT_EVALUATION)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--keep", action="store_true", help="keep every checkpoint, not only the plan + YAQA one")
    args = parser.parse_args()
    console = Console()
    lm = load_model(args.model)
    infos = find_linears(lm.model)

    profile_dir = args.profile
    if profile_dir is None:
        console.rule("[bold]profile")
        profile_dir = args.out / "profile"
        profile_model(lm, args.calib, out_dir=profile_dir)
    console.rule("[bold]solve")
    plan = solve(profile_dir, args.budget)
    plan.save(args.out / "plan.json")
    if plan.uniform is None:
        raise SystemExit(f"no single candidate format fits {args.budget}")
    uniform = {i.name: plan.uniform["format"] for i in infos}
    int4 = {i.name: "int4-g128" for i in infos}
    rows = {
        "plan + YAQA": (plan.formats, "yaqa"),
        f"{plan.uniform['format']} + YAQA": (uniform, "yaqa"),
        f"{plan.uniform['format']} + LDLQ": (uniform, "ldlq"),
        f"{plan.uniform['format']} + RTN": (uniform, "rtn"),
        "plan + RTN": (plan.formats, "rtn"),
        "int4-g128 + RTN": (int4, "rtn"),
    }
    results_path = args.out / "results.json"
    results = read_json(results_path, "results") if results_path.is_file() else {}
    # Cheapest first (round-to-nearest needs seconds), so a short run still gets the baselines.
    order = sorted(rows, key=lambda label: rows[label][1] != "rtn")
    for label in order:
        formats, rounding = rows[label]
        key = f"{label} @ {args.budget}, {args.windows} windows"
        if key in results:
            continue
        console.rule(f"[bold]{label}")
        ckpt = args.out / label.replace(" + ", "-").replace(" ", "_")
        apply_formats(lm, formats, ckpt, rounding=rounding, profile_dir=profile_dir, overwrite=True)
        r = evaluate(lm, str(ckpt), args.data, windows=args.windows, seqlen=512)
        results[key] = {"storage_bpw": storage_bpw(infos, formats), "kl": r.kl_mean, "kl_se": r.kl_se,
                        "kl_p99": r.kl_p99, "top1": r.top1_agreement, "ppl": r.ppl_candidate,
                        "ppl_reference": r.ppl_reference}
        write_json(results_path, results)
        if not args.keep and label != "plan + YAQA":
            shutil.rmtree(ckpt, ignore_errors=True)

    table = Table(title=f"{args.model}: plan at {args.budget} "
                        f"({plan.totals.get('storage_bpw', 0):.3f} storage bpw), {args.windows} × 512 tokens of "
                        f"{Path(args.data).name}")
    for col in ("candidate", "bpw", "KL ± se", "KL p99", "top-1", "ppl"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for label in rows:
        r = results[f"{label} @ {args.budget}, {args.windows} windows"]
        table.add_row(label, f"{r['storage_bpw']:.3f}", f"{r['kl']:.4f} ± {r['kl_se']:.4f}", f"{r['kl_p99']:.2f}",
                      f"{100 * r['top1']:.1f} %", f"{r['ppl']:.2f} ({r['ppl_reference']:.2f})")
    console.print(table)


if __name__ == "__main__":
    main()
