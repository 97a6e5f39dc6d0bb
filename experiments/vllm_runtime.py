"""What serving in vLLM costs: the plan vLLM runs against the unconstrained plan and the usual W{b}A16 baselines.

    python experiments/vllm_runtime.py PROF [--budgets 4.25bpw,3.25bpw] [--windows 32] [--out runs/vllm]

PROF is a finished profile with hessians/ that measured both menus (`bitplan profile smollm2-135m --formats
default,vllm --out PROF`). For each budget it solves, rounds and evaluates on WikiText-2 (text the profile never
saw), against the original model:

  plan + YAQA            `bitplan solve` with the default menu: rotated grids and integers, any format per layer
  vLLM plan + YAQA       `bitplan solve --runtime vllm`: unrotated symmetric/integer-zero formats only, q/k/v and
                         gate/up tied (vLLM fuses them): what `bitplan export compressed-tensors` can write
  W{b}A16 + LDLQ         sint{b}-g64 on every layer (b = the budget's whole bits: compressed-tensors' W{b}A16
                         preset, with groups of 64 since vLLM needs whole groups and 576 = 4.5 × 128 on the
                         default model; b + 0.25 bits per weight, the budget exactly), one-sided LDLQ (GPTQ's
                         update, H_I = Σxxᵀ)
  W{b}A16 + RTN          … rounded to nearest

The gap between the first two rows is what vLLM's runtime cannot express (per-layer rotations, vector grids,
untied q/k/v). Every row is kept in OUT/results.json as it finishes; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.apply import apply_formats
from bitplan.data import DEFAULT_EVALUATION
from bitplan.evaluate import evaluate
from bitplan.formats import get_format
from bitplan.io import read_json, write_json
from bitplan.models import find_linears, load_model
from bitplan.solve import solve


def storage_bpw(infos, formats: dict[str, str]) -> float:
    """Stored bits (codes, scales, everything) per weight over the block linears."""
    bits = sum(get_format(formats[i.name]).storage_bits(i.out_features, i.in_features) for i in infos)
    return bits / sum(i.out_features * i.in_features for i in infos)


def rows_for(profile: Path, budget: str, infos) -> dict[str, tuple[dict[str, str], str]]:
    plan = solve(profile, budget, formats="default", notes_to_stderr=False)
    vllm = solve(profile, budget, runtime="vllm", notes_to_stderr=False)
    b = math.floor(float(budget.removesuffix("bpw")))
    uniform = {i.name: f"sint{b}-g64" for i in infos}
    return {
        "plan + YAQA": (plan.formats, "yaqa"),
        "vLLM plan + YAQA": (vllm.formats, "yaqa"),
        f"W{b}A16 + LDLQ": (uniform, "ldlq"),
        f"W{b}A16 + RTN": (uniform, "rtn"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="a finished profile folder with hessians/ and both menus")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="4.25bpw,3.25bpw")
    parser.add_argument("--data", default=DEFAULT_EVALUATION)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/vllm"))
    args = parser.parse_args()
    console = Console()
    lm = load_model(args.model)
    infos = find_linears(lm.model)
    results_path = args.out / "results.json"
    results = read_json(results_path, "results") if results_path.is_file() else {}
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    table = Table(title=f"{args.model}: {args.windows} × 512 tokens of {Path(args.data).name}, KL against the original")
    for col in ("budget", "candidate", "bpw", "KL ± se", "top-1", "ppl"):
        table.add_column(col, justify="left" if col in ("budget", "candidate") else "right")
    for budget in budgets:
        rows = rows_for(args.profile, budget, infos)
        for label, (formats, rounding) in sorted(rows.items(), key=lambda kv: kv[1][1] != "rtn"):  # cheap first
            key = f"{label} @ {budget}, {args.windows} windows"
            if key in results:
                continue
            console.rule(f"[bold]{budget}: {label}")
            ckpt = args.out / "checkpoint"
            apply_formats(lm, formats, ckpt, rounding=rounding, profile_dir=args.profile, overwrite=True)
            r = evaluate(lm, str(ckpt), args.data, windows=args.windows, seqlen=512)
            results[key] = {"storage_bpw": storage_bpw(infos, formats), "kl": r.kl_mean, "kl_se": r.kl_se,
                            "top1": r.top1_agreement, "ppl": r.ppl_candidate, "ppl_reference": r.ppl_reference,
                            "formats": sorted(set(formats.values()))}
            write_json(results_path, results)
            shutil.rmtree(ckpt, ignore_errors=True)
        for label in rows:
            r = results[f"{label} @ {budget}, {args.windows} windows"]
            table.add_row(budget, label, f"{r['storage_bpw']:.3f}", f"{r['kl']:.4f} ± {r['kl_se']:.4f}",
                          f"{100 * r['top1']:.1f} %", f"{r['ppl']:.2f} ({r['ppl_reference']:.2f})")
    console.print(table)


if __name__ == "__main__":
    main()
