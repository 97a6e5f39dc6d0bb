"""Wall time and peak memory of `bitplan profile` on the default model, by phase, against plain passes.

    python benchmarks/profile_bench.py --samples 32 --seqlen 256 --noise-samples 2

Measures, in one process and on the same calibration windows:
  - one plain forward+backward pass over all calibration tokens (sampled labels, frozen weights: exactly the
    sketch's passes without the factor hooks), and one plain forward pass;
  - a full profile run (fresh output directory), split into the sketch's forward+backward, its factor
    accumulation, noise injection, hessian writing/checkpoints, and the per-layer coefficients and format errors;
and prints each as seconds and as a ratio to the plain forward+backward pass. Peak memory is the process's
maximum resident set size after each stage (it only grows). On a shared machine, note the load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.data import DEFAULT_CALIBRATION, token_windows  # noqa: E402
from bitplan.models import load_model  # noqa: E402
from bitplan.profile import profile_model  # noqa: E402
from bitplan.profile.hooks import frozen_weights  # noqa: E402
from bitplan.profile.sketch import sample_labels  # noqa: E402



def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plain_passes(model, windows: torch.Tensor, batch: int, seed: int) -> tuple[float, float]:
    """(forward+backward seconds, forward seconds) over all windows, batched like the profile."""
    emb = model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(torch.is_grad_enabled()))
    fb = fwd = 0.0
    try:
        with frozen_weights(model):
            for s in range(0, windows.shape[0], batch):
                ids = windows[s:s + batch]
                t0 = time.perf_counter()
                with torch.enable_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
                    labels = sample_labels(logits, list(range(s, s + ids.shape[0])), seed)
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
                fb += time.perf_counter() - t0
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=False)
                fwd += time.perf_counter() - t0
    finally:
        hook.remove()
    return fb, fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=DEFAULT_CALIBRATION)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--noise-samples", type=int, default=2)
    ap.add_argument("--sketch-chunk", type=int, default=32)
    ap.add_argument("--formats", default="default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="profile output directory (default: a temporary one, removed after)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default; 1 on a busy shared machine)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    console = Console()

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    t_load = time.perf_counter() - t0
    windows = token_windows(loaded.tokenizer, args.calib, args.samples, args.seqlen, args.seed)
    mem_model = peak_gb()
    fb, fwd = plain_passes(loaded.model, windows, args.batch_size, args.seed)
    mem_plain = peak_gb()

    with tempfile.TemporaryDirectory(prefix="profile-bench-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "profile"
        t0 = time.perf_counter()
        profile = profile_model(loaded, args.calib, args.samples, args.seqlen, args.seed, out,
                                sketch_chunk=args.sketch_chunk, noise_samples=args.noise_samples,
                                formats=args.formats, batch_size=args.batch_size, overwrite=True)
        total = time.perf_counter() - t0
    mem_profile = peak_gb()
    load1 = os.getloadavg()
    t = profile.extra["timing_s"]

    tokens = args.samples * args.seqlen
    table = Table(title=f"bitplan profile {args.model}: {args.samples} × {args.seqlen} = {tokens:,} calibration tokens, "
                        f"noise on {args.noise_samples} windows, T' = {args.sketch_chunk}, "
                        f"{len(profile.formats)} formats, {len(profile.layers)} layers")
    for col in ("stage", "seconds", "÷ plain fwd+bwd", "s per window"):
        table.add_column(col, justify="left" if col == "stage" else "right")

    def row(name: str, sec: float) -> None:
        table.add_row(name, f"{sec:.1f}", f"{sec / fb:.2f}", f"{sec / args.samples:.2f}")

    row("plain forward+backward (reference)", fb)
    row("plain forward", fwd)
    row("profile: sketch forward+backward", t["factors.forward_backward"])
    row("profile: factor accumulation", t["factors.accumulate"])
    row("profile: checkpoints + hessians/ writes",
        t["factors"] - t["factors.forward_backward"] - t["factors.accumulate"])
    row("profile: noise injection (incl. cache)", t["noise"])
    row("profile: coefficients (block LDL, held-out)", t["layers"])
    row("profile: per-format errors", t["formats"])
    row("profile: total (incl. report)", total)
    console.print(table)
    console.print(f"peak RSS: model loaded {mem_model:.2f} GB; after plain passes {mem_plain:.2f} GB; "
                  f"after profile {mem_profile:.2f} GB.  model load {t_load:.1f} s.  "
                  f"load average (1 min) before {load0[0]:.1f}, after {load1[0]:.1f} on {os.cpu_count()} CPUs, "
                  f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
