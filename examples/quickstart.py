"""bitplan end to end on the default model: profile → solve → apply → eval.

    python examples/quickstart.py [--budget 3.25bpw] [--out runs/quickstart]

What it costs with the defaults: about 10 minutes on 2 CPU cores with nothing else running, about 7.6 GB of memory,
and about 4.8 GB of disk: 3.8 GB under --out (the profile's Kronecker factors in OUT/profile/hessians, 3.5 GB, and
three checkpoints of 0.1 GB) and the rest in bitplan's cache (the default model converted once to safetensors,
the reference logits).

1. profile: Kronecker-factored Hessians of every block linear from State of the Union addresses (the built-in
            text `sotu`), and each candidate format's error on each layer;
2. solve:   each layer's format under the budget, from the profile's YAQA coefficients;
3. apply:   YAQA rounding per the plan into a packed checkpoint; the best single format that fits the same budget
            (the plan's `uniform`: lowest predicted ΔKL) rounded with YAQA and with round-to-nearest;
4. eval:    KL, top-1 agreement and perplexity against the original on WikiText-2 (the built-in text `wikitext2`,
            which the method never saw). The allocation's own gain is uniform + YAQA ÷ plan + YAQA (same
            rounding); the rounding's gain is uniform + RTN ÷ uniform + YAQA (same formats).
An interrupted profile resumes where it stopped when the script is run again with the same arguments.

A smaller run, for a test: --samples 8 --seqlen 128 --eval-windows 2 --eval-seqlen 128
--formats int2-g128,int3-g128,int4-g128 --out DIR. The profile's block LDL of every layer (its coefficients) costs
the same at any --samples, so even this run takes minutes on a CPU; --model takes any small causal LM folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.apply import apply_formats, apply_plan
from bitplan.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from bitplan.evaluate import evaluate
from bitplan.models import cache_dir, find_linears, load_model
from bitplan.profile import profile_model
from bitplan.solve import solve

# Candidates whose per-layer error is quick to measure on a CPU (grids with p ≤ 2 and ≤ 256 points, integers);
# `bitplan profile` measures all of `bitplan formats` by default.
QUICK_FORMATS = ["higgs-p2-n16-g128", "higgs-p2-n32-g128", "higgs-p2-n64-g128", "higgs-p2-n128-g128",
                 "higgs-p2-n256-g128", "higgs-p1-n8-g128", "higgs-p1-n16-g128", "higgs-p1-n32-g128",
                 "higgs-p1-n64-g128", "int2-g128", "int3-g128", "int4-g128", "int5-g128", "int6-g128", "int8-g128",
                 "fp16"]
COST = ("about 10 min on 2 CPU cores alone, ~7.6 GB of memory, ~4.8 GB of disk (3.8 GB under the output folder, "
        "3.5 GB of it the profile's Kronecker factors in profile/hessians; the rest in bitplan's cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="3.25bpw")
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION, help="calibration text (default: %(default)s)")
    parser.add_argument("--data", default=DEFAULT_EVALUATION, help="evaluation text (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    parser.add_argument("--formats", default=",".join(QUICK_FORMATS),
                        help="candidate formats, comma-separated (default: 16 formats quick to measure on a CPU)")
    parser.add_argument("--noise-samples", type=int, default=0,
                        help="calibration windows for the noise-injection α_noise (default: %(default)s, skipped)")
    parser.add_argument("--judge-samples", type=int, default=0,
                        help="windows sampled from the model to judge each layer's fit (default: %(default)s: "
                             "the calibration halves' forecast alone)")
    parser.add_argument("--eval-windows", type=int, default=8,
                        help="evaluation windows (default: %(default)s)")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="output folder (default: %(default)s)")
    args = parser.parse_args()
    console = Console()
    out = args.out.resolve()
    default_run = all(getattr(args, k) == parser.get_default(k)
                      for k in ("model", "samples", "seqlen", "formats", "noise_samples", "judge_samples",
                                "eval_windows", "eval_seqlen"))
    console.print(f"[bold]bitplan quickstart[/]: {args.model} at {args.budget}, writing to {out}", soft_wrap=True)
    console.print(f"cost of the default run: {COST}" + ("" if default_run else "; this run's settings are smaller"))
    clock = Clock()

    console.rule("[bold]1. profile")
    model = load_model(args.model)
    profile_dir = out / "profile"
    profile_model(model, args.calib, samples=args.samples, seqlen=args.seqlen, out_dir=profile_dir,
                  noise_samples=args.noise_samples, formats=args.formats, judge_samples=args.judge_samples)

    clock.lap("profile")
    console.rule("[bold]2. solve")
    plan = solve(profile_dir, args.budget)
    plan_path = out / "plan.json"
    plan.save(plan_path)
    uniform = plan.uniform["format"] if plan.uniform else None
    console.print(f"plan: {plan.totals['storage_bpw']:.3f} storage bits per weight over the block linears; "
                  f"best uniform format at this budget: {uniform or 'none of the candidates fits'}")

    clock.lap("solve")
    console.rule("[bold]3. apply")
    # (label, checkpoint, storage bpw); the plan's own rounding first, then the uniform format with both roundings
    candidates = [("plan + YAQA", out / "plan-yaqa", plan.totals["storage_bpw"])]
    apply_plan(plan_path, candidates[0][1], model=model, rounding="yaqa", overwrite=True)
    if uniform:
        formats = {info.name: uniform for info in find_linears(model.model)}
        for rounding, label in (("yaqa", "YAQA"), ("rtn", "RTN")):
            folder = out / f"uniform-{rounding}"
            apply_formats(model, formats, folder, rounding=rounding, profile_dir=profile_dir, overwrite=True)
            candidates.append((f"{uniform} + {label}", folder, plan.uniform["storage_bpw"]))

    clock.lap("apply")
    console.rule("[bold]4. eval")
    results = {}
    for label, folder, _ in candidates:
        results[label] = evaluate(model, str(folder), args.data, windows=args.eval_windows, seqlen=args.eval_seqlen,
                                  json_out=folder.with_name(f"eval-{folder.name}.json"))
    console.print(headline(args, candidates, results))
    if uniform:
        plan_kl, yaqa_kl, rtn_kl = (results[label].kl_mean for label, _, _ in candidates)
        console.print(f"the allocation's own gain, same rounding: {uniform} + YAQA has {yaqa_kl / plan_kl:.2f} × the "
                      f"plan's KL\nthe rounding's own gain, same format: {uniform} rounded to nearest (RTN) has "
                      f"{rtn_kl / yaqa_kl:.2f} × YAQA's KL")

    clock.lap("eval")
    console.rule("[bold]outputs")
    paths = [("profile", profile_dir), ("plan", plan_path)]
    for label, folder, _ in candidates:
        paths += [(f"checkpoint, {label}", folder), (f"eval, {label}", folder.with_name(f"eval-{folder.name}.json"))]
    paths.append(("bitplan's cache (converted model, reference logits)", cache_dir()))
    for what, path in paths:
        console.print(f"{what}: {path} ({_size(path)})", soft_wrap=True)  # a path is copied whole, never folded
    console.print(f"time: {clock}")


def headline(args, candidates, results) -> Table:
    first = results[candidates[0][0]]
    table = Table(title=f"{args.model} at {args.budget}: KL to the original on {args.eval_windows} × "
                        f"{args.eval_seqlen} tokens of {args.data} (its perplexity {first.ppl_reference:.1f})")
    for column in ("candidate", "bpw", "KL ± se", "÷ plan", "top-1", "ppl"):
        table.add_column(column, justify="left" if column == "candidate" else "right", no_wrap=True)
    for label, _, bpw in candidates:
        r = results[label]
        table.add_row(label, f"{bpw:.2f}", f"{r.kl_mean:.3f} ± {r.kl_se:.3f}", f"{r.kl_mean / first.kl_mean:.2f} ×",
                      f"{100 * r.top1_agreement:.1f} %", f"{r.ppl_candidate:.1f}")
    return table


class Clock:
    """Wall time of each step, for the closing line."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps.append((step, now - self.last))
        self.last = now

    def __str__(self) -> str:
        total = time.perf_counter() - self.start
        return ", ".join(f"{step} {s:.0f} s" for step, s in self.laps) + f"; {total / 60:.1f} min in all"


def _size(path: Path) -> str:
    if path.is_file():
        size = path.stat().st_size
    else:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


if __name__ == "__main__":
    main()
