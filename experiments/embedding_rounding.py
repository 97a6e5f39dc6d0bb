"""Which rounding for the token embedding: round-to-nearest against one-sided LDLQ along the hidden dimension.

    python experiments/embedding_rounding.py [--formats int4-g128,q4_0] [--calib-windows 8] [--eval-windows 8]

The embedding W [vocab, hidden] is a lookup table: no input passes through it, so one-sided LDLQ has no input
covariance of its own. Error feedback along the hidden dimension can still be steered by a hidden × hidden factor
H (each row's error e is charged eᵀ H e), estimated from calibration text in one of two ways:

- `ldlq-head`: H = E[h hᵀ] of the final hidden states h, the input of the head; for a tied matrix the head role is
  a linear layer with that input, and this is its one-sided LDLQ factor;
- `ldlq-grad`: H = E[g gᵀ] of the gradient g reaching the embedding's output (labels sampled from the model's own
  distribution, so E[g gᵀ] is the Fisher of the embedding role);
- `ldlq-both`: the two, each normalized to mean diagonal 1, summed (a tied matrix plays both roles).

Only the embedding is rounded (every other weight stays as loaded; a tied head shares the rounded matrix), and each
variant's held-out KL against the original model is measured by bitplan's evaluate on WikiText-2 windows; the
calibration (sotu) never overlaps them. Apply rounds the embedding to nearest unless this table says otherwise.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bitplan.apply.layer import quantize_layer
from bitplan.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, token_windows
from bitplan.evaluate import evaluate
from bitplan.formats import get_format
from bitplan.models import DEFAULT_MODEL, load_model

METHODS = ("rtn", "ldlq-head", "ldlq-grad", "ldlq-both")


def hidden_factors(model: torch.nn.Module, windows: torch.Tensor, batch: int = 2,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """E[h hᵀ] of the head's input and E[g gᵀ] of the gradient at the embedding's output (float64, hidden × hidden),
    over every token of `windows`; the loss is the cross-entropy of labels sampled from the model's own softmax."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    d = emb.embedding_dim
    sums = {"head": torch.zeros(d, d, dtype=torch.float64), "grad": torch.zeros(d, d, dtype=torch.float64)}
    count = 0

    def take_input(_module, args):
        x = args[0].detach().reshape(-1, d).double()
        sums["head"].add_(x.T @ x)

    def take_grad(g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, d).double()
        sums["grad"].add_(g.T @ g)

    def watch_output(_module, _args, out):
        out = out.detach().requires_grad_(True)   # weights are frozen: the output is where the gradient stops
        out.register_hook(take_grad)
        return out

    gen = torch.Generator().manual_seed(seed)
    hooks = [head.register_forward_pre_hook(take_input), emb.register_forward_hook(watch_output)]
    try:
        for ids in windows.split(batch):
            logits = model(ids).logits.float()
            flat = logits.reshape(-1, logits.shape[-1])
            with torch.no_grad():
                labels = torch.multinomial(flat.softmax(-1), 1, generator=gen).squeeze(1)
            F.cross_entropy(flat, labels, reduction="sum").backward()
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count for k, v in sums.items()}


def normalized(H: torch.Tensor) -> torch.Tensor:
    return H / H.diagonal().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--formats", default="int4-g128,q4_0",
                        help="comma-separated formats; those the embedding's shape rules out are skipped")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--data", default=DEFAULT_EVALUATION)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    args = parser.parse_args()
    console = Console()
    start = time.time()

    ref = load_model(args.model)
    cand = load_model(args.model)
    emb = cand.model.get_input_embeddings()
    W = emb.weight.detach().clone()
    name = next(n for n, m in cand.model.named_modules() if m is emb)
    head = cand.model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    calib = token_windows(ref.tokenizer, args.calib, args.calib_windows, args.calib_seqlen)
    factors = hidden_factors(ref.model, calib)
    factors["both"] = normalized(factors["head"]) + normalized(factors["grad"])
    console.print(f"{args.model}: embedding {name} {tuple(W.shape)}, head {'tied' if tied else 'untied'}; "
                  f"factors from {calib.numel()} {args.calib} tokens in {time.time() - start:.0f} s")

    formats = []
    for f in args.formats.split(","):
        fmt = get_format(f.strip())
        applicable = getattr(fmt, "applicable", None)
        if applicable is not None and not applicable(*W.shape):
            console.print(f"[yellow]{fmt.name}: not applicable to a row of {W.shape[1]}; skipped[/]")
            continue
        formats.append(fmt)
    table = Table(title=f"Embedding rounding: held-out KL on {args.eval_windows} × {args.eval_seqlen} {args.data} "
                        f"tokens (only the embedding quantized)")
    for col in ("format", "bpw", "rounding", "rel. error", "mean KL", "± s.e.", "KL ÷ RTN's"):
        table.add_column(col, justify="left" if col in ("format", "rounding") else "right")
    for fmt in formats:
        rtn_kl = None
        for method in args.methods.split(","):
            H = None if method == "rtn" else factors[method.split("-", 1)[1]]
            res = quantize_layer(name, W, fmt, "rtn" if H is None else "ldlq", H_in=H)
            with torch.no_grad():
                emb.weight.copy_(res.W_hat)   # a tied head shares the parameter
            r = evaluate(ref, cand, args.data, windows=args.eval_windows, seqlen=args.eval_seqlen, progress=False)
            rtn_kl = r.kl_mean if method == "rtn" else rtn_kl
            ratio = f"{r.kl_mean / rtn_kl:.3f}" if rtn_kl else ""
            table.add_row(fmt.name, f"{fmt.storage_bits(*W.shape) / W.numel():.3f}", method,
                          f"{res.stats['rel_err']:.4g}", f"{r.kl_mean:.4g}", f"{r.kl_se:.2g}", ratio)
            console.print(f"{fmt.name} {method}: KL {r.kl_mean:.4g} ± {r.kl_se:.2g} ({time.time() - start:.0f} s)")
    with torch.no_grad():
        emb.weight.copy_(W)
    console.print(table)
    console.print(f"{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
