"""The judge's phase by part on the default model: sampling its windows, its factor pass, judging each layer.

    python benchmarks/judge_bench.py --windows 16 --profile p256

The factor pass runs both ways on the same sampled windows, batch by batch and alternating which goes first
(so both see the same machine load): with the calibration's moments (Σxxᵀ and the windows' gradient Grams, as
the judge accumulated them before) and without them (what the judge reads: the factors and Σ‖G_c‖²). It prints
each way's seconds, the factor accumulation's share, their ratios, and the largest difference between the two
ways' factors (they must agree exactly). With `--profile DIR` (a finished profile that kept hessians/, judge
included) it also times judging the first `--layers` layers' fits under the judge's factors.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.models import find_linears, get_module, load_model  # noqa: E402
from bitplan.profile.factors import FactorSums  # noqa: E402
from bitplan.profile.judge import JUDGE_WINDOW_OFFSET, sample_windows, start_token  # noqa: E402
from bitplan.profile.judge_phase import judge_layer  # noqa: E402
from bitplan.profile.schema import load_profile  # noqa: E402
from bitplan.profile.sketch import SketchTimes, accumulate_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16, help="sampled windows (the default profile's judge: 64)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1, help="sketch chunk T' (the default profile's: 1)")
    ap.add_argument("--profile", default=None, help="a finished profile with hessians/ (times the judging too)")
    ap.add_argument("--layers", type=int, default=21, help="layers to judge with --profile")
    args = ap.parse_args()
    console = Console()
    loaded = load_model(args.model)
    net, infos = loaded.model, find_linears(loaded.model)
    modules = {i.name: get_module(net, i.name) for i in infos}

    t0 = time.perf_counter()
    windows = sample_windows(net, args.windows, args.seqlen, start_token(net, loaded.tokenizer), seed=0)
    sampling = time.perf_counter() - t0

    ways = {"with moments": True, "without (judge)": False}
    sums = {w: {i.name: FactorSums.zeros(i.out_features, i.in_features, m) for i in infos} for w, m in ways.items()}
    times = {w: SketchTimes() for w in ways}
    for k, s in enumerate(range(0, args.windows, args.batch_size)):
        idx = list(range(s, min(args.windows, s + args.batch_size)))
        for w in (list(ways) if k % 2 == 0 else list(ways)[::-1]):
            accumulate_batch(net, modules, windows[idx], [JUDGE_WINDOW_OFFSET + i for i in idx], 0, args.chunk,
                             sums[w], times[w], moments=ways[w])
    diff = max(float((getattr(sums["with moments"][n], h) - getattr(sums["without (judge)"][n], h)).abs().max())
               for n in modules for h in ("h_out", "h_in"))

    tokens = args.windows * args.seqlen
    table = Table(title=f"judge's factor pass: {args.windows} sampled windows × {args.seqlen} tokens, T' = {args.chunk}")
    for col in ("way", "pass s", "of which accumulate s", "pass ÷ with moments", "accumulate ÷ with moments"):
        table.add_column(col, justify="left" if col == "way" else "right")
    base = times["with moments"]
    for w, t in times.items():
        table.add_row(w, f"{t.total:.1f}", f"{t.accumulate:.1f}", f"{t.total / base.total:.3f}",
                      f"{t.accumulate / base.accumulate:.3f}")
    console.print(table)
    console.print(f"sampling the {args.windows} windows: {sampling:.1f} s ({tokens} tokens); largest difference "
                  f"between the two ways' factors: {diff:.3g}")

    if args.profile:
        out = Path(args.profile)
        prof = load_profile(out)
        t0 = time.perf_counter()
        layers = prof.layers[:args.layers]
        for rec in layers:
            judge_layer(out, rec)
        console.print(f"judging {len(layers)} layers' fits (reading their factors included): "
                      f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
