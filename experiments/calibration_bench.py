"""How adaptive rounding improves with calibration: one format on every layer, four roundings, several profiles.

    python experiments/calibration_bench.py PROFILE_DIR [PROFILE_DIR ...] [--formats int3-g128,int4-g128]
           [--windows 32] [--out runs/calibration-bench.json]

Each PROFILE_DIR is a `bitplan profile` output with hessians/ (make them with different --samples). For every
profile and format it writes a checkpoint with each rounding, evaluates it against the original model on
WikiText-2 (text no profile saw), and prints mean KL:
  rtn        round-to-nearest (needs no calibration: measured once per format)
  ldlq       one-sided block LDLQ, H_O = I, H_I = Σxxᵀ (GPTQ's update)
  yaqa raw   two-sided block LDLQ with the raw factors (λ = 0)
  yaqa auto  two-sided, H_O and H_I shrunk by λs per layer chosen on the profile's held-out half (`--shrink auto`)
next to the held-out predicted ratio YAQA ÷ LDLQ from the profile (Σ α·t²·gain over the layers, gains
cross-fitted: LDL on one calibration half, judged under the other), the same judged on the model's own samples
for profiles made with --judge-samples (profile/judge.py), and the measured one. Also the profile's wall
time and its ratio to one plain forward+backward pass (weight gradients included) over the same calibration.
With --heldout-calib N it also evaluates every checkpoint on N windows of the calibration text (--calib-data)
that no profile's calibration windows touched: text of the calibration's kind that no rounding fitted, which is
what the forecast (judged on the other calibration half) predicts; WikiText measures how far that carries.
Results are kept in --out as they come, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bitplan.apply import apply_formats
from bitplan.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, calibration_spans
from bitplan.evaluate import evaluate
from bitplan.io import read_json, write_json
from bitplan.models import find_linears, load_model
from bitplan.profile.report import forecast_kl
from bitplan.profile.schema import load_profile

VARIANTS = {"rtn": ("rtn", 0.0), "ldlq": ("ldlq", 0.0), "yaqa raw": ("yaqa", 0.0), "yaqa auto": ("yaqa", "auto")}


def plain_forward_backward_s(lm, windows: torch.Tensor, batch: int = 4) -> float:
    """Seconds for one ordinary training-style pass (weight gradients, no hooks) over `windows`."""
    params = [p for p in lm.model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    start = time.perf_counter()
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch]
        out = lm.model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        lm.model.zero_grad(set_to_none=True)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="int3-g128,int4-g128")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", default=DEFAULT_EVALUATION)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--fwd-bwd-windows", type=int, default=8, help="windows timed for the plain pass (0 skips it)")
    parser.add_argument("--heldout-calib", type=int, default=0, metavar="N",
                        help="also evaluate on N windows of the calibration text outside every profile's windows")
    parser.add_argument("--calib-data", default=DEFAULT_CALIBRATION, help="the profiles' calibration text")
    parser.add_argument("--out", type=Path, default=Path("runs/calibration-bench.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/calibration-bench-ckpt"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 200)   # a wide table, whole in a log file
    lm = load_model(args.model)
    names = [i.name for i in find_linears(lm.model)]
    results = read_json(args.out, "benchmark results") if args.out.is_file() else {}
    formats = [f for f in args.formats.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    profiles = {pdir: load_profile(pdir) for pdir in args.profiles}
    spans = sorted({s for p in profiles.values() for s in calibration_spans(lm.tokenizer, p.calibration,
                                                                             args.calib_data)}) if args.heldout_calib else []
    # which held-out windows a result was measured on: they depend on the set of profiles excluded
    heldout_id = hashlib.sha256(repr((args.heldout_calib, args.seqlen, spans)).encode()).hexdigest()[:16]

    def run(key: str, fmt: str, variant: str, profile_dir: Path | None) -> dict:
        if key in results and (not args.heldout_calib or results[key].get("heldout_id") == heldout_id):
            return results[key]
        rounding, shrink = VARIANTS[variant]
        ckpt = args.work / key.replace(" ", "_").replace("/", "_")
        t0 = time.perf_counter()
        applied = apply_formats(lm, {n: fmt for n in names}, ckpt, rounding=rounding, profile_dir=profile_dir,
                                shrink=shrink, overwrite=True)
        apply_s = time.perf_counter() - t0
        ev = evaluate(lm, str(ckpt), args.data, windows=args.windows, seqlen=args.seqlen)
        lams = {side: [float(s.get(side, 0.0)) for s in applied.stats.values()] for side in ("shrink_out", "shrink_in")}
        results[key] = {"kl": ev.kl_mean, "kl_se": ev.kl_se, "top1": ev.top1_agreement, "apply_s": apply_s,
                        **{f"mean_{side}": sum(v) / len(v) for side, v in lams.items()}}
        if args.heldout_calib:
            held = evaluate(lm, str(ckpt), args.calib_data, windows=args.heldout_calib, seqlen=args.seqlen,
                            exclude=spans)
            results[key].update(kl_calib=held.kl_mean, kl_calib_se=held.kl_se, heldout_id=heldout_id)
        write_json(args.out, results)
        shutil.rmtree(ckpt, ignore_errors=True)
        held = f", held-out calibration text {results[key]['kl_calib']:.4f}" if args.heldout_calib else ""
        console.print(f"{key}: KL {ev.kl_mean:.4f} ± {ev.kl_se:.4f}{held} (apply {apply_s:.0f} s)")
        return results[key]

    table = Table(title=f"{args.model}: one format on every layer, mean KL on {args.windows} × {args.seqlen} "
                        f"tokens of {Path(args.data).name}")
    held_cols = ("on calib. text",) if args.heldout_calib else ()
    for col in ("calibration", "format", *variants, "auto ÷ ldlq", *held_cols, "predicted", "judged", "raw ÷ ldlq",
                *held_cols, "predicted", "judged", "profile", "÷ fwd+bwd"):
        table.add_column(col, justify="left" if col in ("calibration", "format") else "right")
    for pdir, profile in profiles.items():
        tokens = profile.calibration["tokens"]
        timing = profile.extra.get("timing_s", {})
        wall = sum(v for k, v in timing.items() if "." not in k)
        key_fb = f"fwd-bwd/{pdir}"
        if key_fb not in results and args.fwd_bwd_windows > 0:
            from bitplan.data import token_windows

            n = min(args.fwd_bwd_windows, profile.calibration["samples"])
            win = token_windows(lm.tokenizer, profile.calibration["source"], n, profile.calibration["seqlen"], 0)
            results[key_fb] = plain_forward_backward_s(lm, win) * profile.calibration["samples"] / n
            write_json(args.out, results)
        for fmt in formats:
            kl, kl_calib = {}, {}
            for v in variants:
                key = f"{fmt}/rtn" if v == "rtn" else f"{fmt}/{v}/{pdir}"
                r = run(key, fmt, v, None if v == "rtn" else pdir)
                kl[v], kl_calib[v] = r["kl"], r.get("kl_calib")
            pred = {v: forecast_kl(profile, fmt, v) for v in ("ldlq", "yaqa raw", "yaqa auto")}
            judged = {v: forecast_kl(profile, fmt, v, "samples") for v in ("ldlq", "yaqa raw", "yaqa auto")}

            def ratio(a, b):
                return f"{a / b:.3f}" if a is not None and b else "–"

            def ratios(v):
                held = (ratio(kl_calib.get(v), kl_calib.get("ldlq")),) if args.heldout_calib else ()
                return (ratio(kl.get(v), kl.get("ldlq")), *held, ratio(pred[v], pred["ldlq"]),
                        ratio(judged[v], judged["ldlq"]))

            table.add_row(f"{profile.calibration['samples']} × {profile.calibration['seqlen']} = {tokens // 1024}K",
                          fmt, *(f"{kl[v]:.4f}" for v in variants), *ratios("yaqa auto"), *ratios("yaqa raw"),
                          f"{wall / 60:.1f} min", f"{wall / results[key_fb]:.1f} ×" if key_fb in results else "–")
    console.print(table)
    console.print("predicted: Σ α_shaped·t²·gain over the layers, gains cross-fitted on the profile's two halves; "
                  "judged: the same judged on the model's own samples (the profile's judge, on by default); "
                  "profile: its phases' wall time (noise injection, format errors and the judge included when it "
                  "ran them)")
    if args.heldout_calib:
        console.print(f"on calib. text: the measured ratio on {args.heldout_calib} × {args.seqlen} tokens of "
                      f"{Path(args.calib_data).name} outside all {len(spans)} calibration windows")


if __name__ == "__main__":
    sys.exit(main())
