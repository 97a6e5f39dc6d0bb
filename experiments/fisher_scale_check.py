"""Which Fisher scale predicts a rounded layer's KL? Each checked layer alone, measured against both.

    python experiments/fisher_scale_check.py PROFILE_DIR [--format int4-g128] [--every 15] [--windows 16]

The profile keeps two scales of a layer's Fisher (profile/coefficients.py): the whole windows' gradients
(α_hessian, cross-token terms included) and the per-chunk factors' own (α_shaped). For every `--every`-th layer
this rounds that layer alone (round-to-nearest, one-sided LDLQ with Σxxᵀ, YAQA with the profile's λs), puts it
into the otherwise original model, and measures the mean per-token ΔKL on windows of the calibration text that no
calibration window touched, and on WikiText. It prints measured ÷ predicted for each scale, with predicted =
α·t²·gain (t² the layer's round-to-nearest error, gain the profile's held-out one, 1 for round-to-nearest), and
the ratios of the summed ΔKL. A scale is right for a rounding when its column is near 1 on the calibration's kind
of text; WikiText shows how much of the gain carries to other text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bitplan.apply.layer import quantize_layer
from bitplan.data import (DEFAULT_CALIBRATION, DEFAULT_EVALUATION, calibration_spans, placed_token_windows,
                          token_windows)
from bitplan.formats import get_format
from bitplan.models import find_linears, get_module, load_model
from bitplan.profile.hessians import load_factors
from bitplan.profile.noise import NoiseMeter, build_cache
from bitplan.profile.report import alpha_shaped
from bitplan.profile.schema import load_profile

ROUNDINGS = ("rtn", "ldlq", "auto")
GAINS = {"rtn": None, "ldlq": "ldlq_gain_heldout", "auto": "yaqa_gain_heldout"}


def rounded(name: str, W: torch.Tensor, fmt, factors, record) -> dict[str, torch.Tensor]:
    return {"rtn": quantize_layer(name, W, fmt, "rtn").W_hat,
            "ldlq": quantize_layer(name, W, fmt, "ldlq", H_in=factors.xtx).W_hat,
            "auto": quantize_layer(name, W, fmt, "yaqa", H_in=factors.h_in, H_out=factors.h_out,
                                   shrink_out=record.extra["shrink_out"] or 0.0,
                                   shrink_in=record.extra["shrink_in"] or 0.0).W_hat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--format", default="int4-g128")
    parser.add_argument("--every", type=int, default=15, help="check every k-th layer")
    parser.add_argument("--windows", type=int, default=16, help="windows of 256 tokens per text")
    parser.add_argument("--calib-data", default=DEFAULT_CALIBRATION, help="the profile's calibration text")
    parser.add_argument("--other-data", default=DEFAULT_EVALUATION)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 200)   # a wide table, whole in a log file
    fmt = get_format(args.format)
    profile = load_profile(args.profile)
    records = {r.name: r for r in profile.layers}
    lm = load_model(args.model)
    spans = calibration_spans(lm.tokenizer, profile.calibration, args.calib_data)
    texts = {"calib. text": placed_token_windows(lm.tokenizer, args.calib_data, args.windows, 256, 7,
                                                 exclude=spans)[0],
             "other": token_windows(lm.tokenizer, args.other_data, args.windows, 256, 0)}
    meters = {t: NoiseMeter(lm.model, build_cache(lm.model, w, 4)) for t, w in texts.items()}

    table = Table(title=f"{args.format}, one layer at a time: measured ΔKL ÷ α·t²·gain, α_hessian / α_shaped "
                        f"(calib. text = {Path(args.calib_data).name} outside its calibration; other = "
                        f"{Path(args.other_data).name})")
    table.add_column("layer")
    for t in texts:
        for v in ROUNDINGS:
            table.add_column(f"{v} {t}", justify="right")
    sums: dict[tuple[str, str], float] = {}
    with console.status("rounding layers") as status:
        for info in find_linears(lm.model)[::args.every]:
            status.update(f"rounding {info.name}")
            r = records[info.name]
            weight = get_module(lm.model, info.name).weight
            original = weight.detach().clone()
            hats = rounded(info.name, original, fmt, load_factors(args.profile, info.name), r)
            t2 = float(((original.double() - hats["rtn"].double()) ** 2).sum() / (original.double() ** 2).sum())
            cells = []
            try:
                for t, meter in meters.items():
                    for v in ROUNDINGS:
                        with torch.no_grad():
                            weight.copy_(hats[v].to(weight.dtype))
                        measured = meter.dkl(info.block)
                        gain = 1.0 if GAINS[v] is None else r.extra[GAINS[v]]
                        pred = {"hessian": r.alpha_hessian * t2 * gain, "shaped": alpha_shaped(r) * t2 * gain}
                        for key, value in (("measured", measured), *pred.items()):
                            sums[(t, v, key)] = sums.get((t, v, key), 0.0) + value
                        cells.append(f"{measured / pred['hessian']:.2f} / {measured / pred['shaped']:.2f}")
            finally:
                with torch.no_grad():
                    weight.copy_(original)
            table.add_row(info.name.removeprefix("model.layers."), *cells)
    console.print(table)

    total = Table(title="summed over the checked layers: measured, and predicted at each scale")
    for col in ("text", "rounding", "measured", "α_hessian", "α_shaped"):
        total.add_column(col, justify="left" if col in ("text", "rounding") else "right")
    for t in texts:
        for v in ROUNDINGS:
            total.add_row(t, v, *(f"{sums[(t, v, k)]:.3g}" for k in ("measured", "hessian", "shaped")))
    console.print(total)
    for t in texts:
        console.print(f"{t}: measured ldlq ÷ rtn {sums[(t, 'ldlq', 'measured')] / sums[(t, 'rtn', 'measured')]:.3f}, "
                      f"auto ÷ ldlq {sums[(t, 'auto', 'measured')] / sums[(t, 'ldlq', 'measured')]:.3f}")
    h, s = "hessian", "shaped"
    console.print(f"forecast (rtn at α_hessian, adaptive at α_shaped): ldlq ÷ rtn "
                  f"{sums[(t, 'ldlq', s)] / sums[(t, 'rtn', h)]:.3f}, auto ÷ ldlq "
                  f"{sums[(t, 'auto', s)] / sums[(t, 'ldlq', s)]:.3f}; all at α_hessian: ldlq ÷ rtn "
                  f"{sums[(t, 'ldlq', h)] / sums[(t, 'rtn', h)]:.3f}")


if __name__ == "__main__":
    main()
