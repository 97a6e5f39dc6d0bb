"""Does a profile predict? Two rank correlations on the default model.

    python experiments/profile_validation.py --profile profiles/smollm2-135m

1. Spearman(α_hessian, α_noise) across all layers of the profile (two independent estimates of the same
   coefficient: Kronecker-factor traces vs noise injection).
2. For N randomly chosen (seeded) single layers, each quantized ALONE by round-to-nearest to a 3-bit-class format
   (after the same randomized Hadamard rotation the profile used), the predicted ΔKL = α · t² against the ΔKL
   measured on held-out text (WikiText-2, not the calibration text): Spearman over the N layers, for α_hessian,
   α_noise and the held-out YAQA coefficient's RTN counterpart.

The measured ΔKL is the mean per-token KL(original ‖ quantized) on the evaluation windows, computed by rerunning
only the quantized layer's block and those after it from cached block inputs.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.data import DEFAULT_EVALUATION, token_windows  # noqa: E402
from bitplan.formats import get_format, rotate_weight, unrotate_weight  # noqa: E402
from bitplan.models import find_linears, get_module, load_model  # noqa: E402
from bitplan.profile import load_profile, rotation_seeds  # noqa: E402
from bitplan.profile.noise import NoiseMeter, build_cache  # noqa: E402
from bitplan.profile.report import short_name, spearman  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def quantize_rtn(W: torch.Tensor, name: str, fmt) -> tuple[torch.Tensor, float]:
    """Round-to-nearest in the rotated basis, back in the original basis; and the relative error t²."""
    seeds = rotation_seeds(name)
    Wr = rotate_weight(W.float(), *seeds) if fmt.rotated else W.float()
    Qr = fmt.dequantize(fmt.quantize(Wr))
    t2 = float(((Wr.double() - Qr.double()) ** 2).sum() / (Wr.double() ** 2).sum())
    W_hat = unrotate_weight(Qr, *seeds) if fmt.rotated else Qr
    return W_hat.to(W.dtype), t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles" / "smollm2-135m"))
    ap.add_argument("--model", default=None, help="model spec (default: the profile's)")
    ap.add_argument("--format", default="int3-g128", help="3-bit-class format each chosen layer is quantized to")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=DEFAULT_EVALUATION)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default; 1 on a busy shared machine)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    console = Console()

    profile = load_profile(args.profile)
    records = {r.name: r for r in profile.layers}
    rho_noise = spearman([r.alpha_hessian for r in profile.layers], [r.alpha_noise for r in profile.layers])
    rho_yaqa = spearman([r.alpha_yaqa_heldout for r in profile.layers], [r.alpha_noise for r in profile.layers])

    loaded = load_model(args.model or profile.model["spec"])
    model = loaded.model
    from bitplan.models import weights_sha256

    if weights_sha256(model) != profile.model["weights_sha256"]:
        raise SystemExit("the model's weights differ from the profile's")
    fmt = get_format(args.format)
    infos = find_linears(model)
    chosen = sorted(random.Random(args.seed).sample(range(len(infos)), args.layers))
    windows = token_windows(loaded.tokenizer, args.data, args.windows, args.seqlen, args.seed)
    t0 = time.perf_counter()
    meter = NoiseMeter(model, build_cache(model, windows, args.batch_size))

    table = Table(title=f"{args.layers} single layers quantized alone to {fmt.name} (RTN, rotated); ΔKL on "
                        f"{args.windows} × {args.seqlen} tokens of {Path(args.data).name}")
    table.add_column("layer", no_wrap=True)
    for col in ("t²", "t² profile", "α_hessian·t²", "α_noise·t²", "measured ΔKL"):
        table.add_column(col, justify="right", no_wrap=True)
    pred_h, pred_n, measured = [], [], []
    for k in chosen:
        info = infos[k]
        rec = records[info.name]
        module = get_module(model, info.name)
        original = module.weight.detach().clone()
        W_hat, t2 = quantize_rtn(original, info.name, fmt)
        try:
            with torch.no_grad():
                module.weight.copy_(W_hat)
            dkl = meter.dkl(info.block)
        finally:
            with torch.no_grad():
                module.weight.copy_(original)
        pred_h.append(rec.alpha_hessian * t2)
        pred_n.append(None if rec.alpha_noise is None else rec.alpha_noise * t2)
        measured.append(dkl)
        prof_t2 = rec.rel_err.get(fmt.name)
        table.add_row(short_name(info.name), f"{t2:.4f}", "–" if prof_t2 is None else f"{prof_t2:.4f}", f"{pred_h[-1]:.3g}",
                      "–" if pred_n[-1] is None else f"{pred_n[-1]:.3g}", f"{dkl:.3g}")
    console.print(table)
    rho_h = spearman(pred_h, measured)
    rho_n = spearman(pred_n, measured)
    ratio = sorted(m / p for m, p in zip(measured, pred_h) if p > 0)
    console.print(f"measured in {time.perf_counter() - t0:.0f} s; median measured/predicted (α_hessian) "
                  f"{ratio[len(ratio) // 2]:.2f}, range {ratio[0]:.2f}–{ratio[-1]:.2f}")
    console.print(f"[bold]Spearman(α_hessian, α_noise) across {len(profile.layers)} layers = {rho_noise:.3f}[/]"
                  + ("" if rho_yaqa is None else f"   (α_yaqa_heldout vs α_noise: {rho_yaqa:.3f})"))
    console.print(f"[bold]Spearman(predicted α_hessian·t², measured ΔKL) over {len(chosen)} layers = {rho_h:.3f}[/]"
                  + ("" if rho_n is None else f"   (with α_noise: {rho_n:.3f})"))


if __name__ == "__main__":
    main()
