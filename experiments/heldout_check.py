"""Does the held-out gain formula hold for real roundings? A check of the profile's forecast on its own terms.

    python experiments/heldout_check.py PROFILE_DIR [--format int4-g128] [--every 15]

The profile forecasts each layer's gain (rounding error ÷ round-to-nearest's) from a formula: block LDLQ with one
calibration half's factors leaves a white innovation, judged under the other half's factors
(bitplan/heldout.py). Here every `--every`-th layer is really rounded with one half's factors (LDLQ with Σxxᵀ,
YAQA raw, YAQA with the profile's λs), its error judged under the other half's H_O ⊗ H_I, both ways, and the
realized gain printed next to the formula's. Agreement means the forecast is exact for text like its judge, and
any gap to another text's measured KL is that text's difference, not the formula's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bitplan.apply.layer import quantize_layer
from bitplan.apply.ldlq import proxy
from bitplan.formats import get_format
from bitplan.models import find_linears, get_module, load_model
from bitplan.profile.hessians import load_factors
from bitplan.profile.report import alpha_shaped
from bitplan.profile.schema import load_profile

VARIANTS = ("ldlq", "raw", "auto")
PREDICTED = {"ldlq": "ldlq_gain_heldout", "raw": "yaqa_gain_heldout_raw", "auto": "yaqa_gain_heldout"}


def realized_gains(name: str, W: torch.Tensor, fmt, factors, record) -> dict[str, float]:
    """Each variant's error judged under the other half's factors ÷ round-to-nearest's, both ways, averaged."""
    E_rtn = W.double() - quantize_layer(name, W, fmt, "rtn").W_hat.double()
    lams = {"ldlq": (0.0, 0.0), "raw": (0.0, 0.0),
            "auto": (record.extra["shrink_out"] or 0.0, record.extra["shrink_in"] or 0.0)}
    out = {}
    for variant in VARIANTS:
        gains = []
        for fit, judge in (("a", "b"), ("b", "a")):
            h_out, h_in, xtx = factors.half(fit)
            j_out, j_in, _ = factors.half(judge)
            rounding = "ldlq" if variant == "ldlq" else "yaqa"
            res = quantize_layer(name, W, fmt, rounding, H_in=xtx if rounding == "ldlq" else h_in, H_out=h_out,
                                 shrink_out=lams[variant][0], shrink_in=lams[variant][1])
            E = W.double() - res.W_hat.double()
            gains.append(proxy(E, j_in, j_out) / proxy(E_rtn, j_in, j_out))
        out[variant] = sum(gains) / 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--format", default="int4-g128")
    parser.add_argument("--every", type=int, default=15, help="check every k-th layer")
    args = parser.parse_args()
    console = Console()
    fmt = get_format(args.format)
    profile = load_profile(args.profile)
    records = {r.name: r for r in profile.layers}
    lm = load_model(args.model)
    names = [i.name for i in find_linears(lm.model)][::args.every]

    table = Table(title=f"held-out gain, realized ÷ formula, {args.format} (judged under the other calibration half)")
    table.add_column("layer")
    for v in VARIANTS:
        table.add_column(f"{v} realized", justify="right")
        table.add_column("formula", justify="right")
    weight = {"realized": {v: 0.0 for v in VARIANTS}, "formula": {v: 0.0 for v in VARIANTS}}
    with console.status("rounding layers") as status:
        for name in names:
            status.update(f"rounding {name}")
            r = records[name]
            W = get_module(lm.model, name).weight.detach()
            got = realized_gains(name, W, fmt, load_factors(args.profile, name), r)
            w = alpha_shaped(r) * r.rel_err[args.format]  # the layer's weight in the forecast (Σ α_shaped·t²·gain)
            cells = []
            for v in VARIANTS:
                pred = r.extra[PREDICTED[v]]
                weight["realized"][v] += w * got[v]
                weight["formula"][v] += w * pred
                cells += [f"{got[v]:.3f}", f"{pred:.3f}"]
            table.add_row(name.removeprefix("model.layers."), *cells)
    console.print(table)
    real, form = weight["realized"], weight["formula"]
    for v in ("raw", "auto"):
        console.print(f"{v} ÷ ldlq over these layers (weighted by α·t²): realized {real[v] / real['ldlq']:.3f}, "
                      f"formula {form[v] / form['ldlq']:.3f}")


if __name__ == "__main__":
    main()
