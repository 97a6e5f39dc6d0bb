"""Would a judge from other text forecast the gain there? The forecast's formula with another profile's factors.

    python experiments/judge_text_check.py FIT_PROFILE JUDGE_PROFILE [JUDGE_PROFILE ...] [--format int4-g128]

The profile forecasts YAQA ÷ LDLQ by fitting on one calibration half and judging under the other. Here each
layer is fitted as `apply` fits it (both halves summed: Σxxᵀ for LDLQ, the raw factors, the factors shrunk by
FIT_PROFILE's λs), and the fit is judged under each JUDGE_PROFILE's factors (both halves summed): a profile of
the same model on other text, such as the evaluation text or the model's own samples. It prints Σ α·t²·gain
for each rounding and the ratios next to FIT_PROFILE's own cross-fitted forecast, so a measured ratio on the
judge's text can be set against what its own factors predict. Diagnostic: a judge drawn from the evaluation
text has seen that text. `bitplan profile --judge-samples N` makes the model's own samples the profile's judge
(profile/judge.py, the same judgement); this script compares judges profiled separately on any text.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from bitplan.profile.factors import FactorSums
from bitplan.profile.hessians import load_factors
from bitplan.profile.judge import judged_gains
from bitplan.profile.report import alpha_shaped, forecast_kl
from bitplan.profile.schema import load_profile

ROUNDINGS = {"ldlq": "ldlq", "raw": "yaqa raw", "auto": "yaqa auto"}   # column → forecast_kl's rounding


def summed(f) -> FactorSums:
    """A judge profile's two halves as one set of factors."""
    return FactorSums(f.h_out, f.h_in, f.xtx, f.grad_sq, f.samples, f.tokens, f.window_grad_sq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fit", type=Path)
    parser.add_argument("judges", type=Path, nargs="+")
    parser.add_argument("--format", default="int4-g128")
    parser.add_argument("--every", type=int, default=1, help="use every k-th layer")
    args = parser.parse_args()
    fit_profile = load_profile(args.fit)
    layers = fit_profile.layers[::args.every]
    console = Console(width=200)
    table = Table(title=f"fitted on {args.fit}, {len(layers)} layers, weights α_shaped·t²({args.format})")
    for col in ("judge", "Σ LDLQ", "Σ raw", "Σ auto", "raw ÷ LDLQ", "auto ÷ LDLQ"):
        table.add_column(col, justify="left" if col == "judge" else "right")

    def row(label: str, sums: dict[str, float]) -> None:
        table.add_row(label, *(f"{sums[k]:.3g}" for k in ("ldlq", "raw", "auto")),
                      f"{sums['raw'] / sums['ldlq']:.3f}", f"{sums['auto'] / sums['ldlq']:.3f}")

    sub = dataclasses.replace(fit_profile, layers=layers)
    own = {k: forecast_kl(sub, args.format, rounding) for k, rounding in ROUNDINGS.items()}
    row("own halves (the profile's forecast)", own)
    for path in args.judges:
        judge_profile = {r.name: r for r in load_profile(path).layers}
        sums = {k: 0.0 for k in ROUNDINGS}
        for r in track(layers, description=f"judging under {path}", console=Console(stderr=True)):
            g = judged_gains(load_factors(args.fit, r.name), summed(load_factors(path, r.name)), r.weight_sq_norm,
                             r.extra.get("shrink_out") or 0.0, r.extra.get("shrink_in") or 0.0)
            weight = alpha_shaped(judge_profile[r.name]) * r.rel_err[args.format]
            for k, gain in (("ldlq", g.ldlq), ("raw", g.yaqa_raw), ("auto", g.yaqa)):
                sums[k] += weight * gain
        row(str(path), sums)
    console.print(table)


if __name__ == "__main__":
    main()
