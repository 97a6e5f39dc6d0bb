"""Speed of bitplan.kernels (needs a CUDA GPU; elsewhere it says so and exits 0).

    python benchmarks/kernels_bench.py [--batches 1,4,16,64] [--formats int4-g128,...] [--shapes 4096x4096,...]
                                        [--model smollm2-135m | --no-model] [--tokens 128]

Per layer shape (out × in), format and batch it prints the fused dequantize-matmul time, the bandwidth achieved
over the bytes the kernel must read (packed codes, scales, zeros, grid table, activations), that bandwidth as a
fraction of the device's copy bandwidth measured in the same run (a large device-to-device copy: read + write
bytes over time), the speedup over a torch fp16 matmul of the same shape, and the layer time including both
Hadamard rotations. Then the end-to-end batch-1 decode speed of the default model as an RTN checkpoint in each
format against fp16. Codes are random words: the kernels' speed does not depend on the values.
Targets: batch-1, 4-bit-class formats on 4096×14336 at ≥ 70 % of copy bandwidth and ≥ 2.5× fp16.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from rich.console import Console
from rich.table import Table

from bitplan.formats import Format, RandomizedHadamard, get_format
from bitplan.formats.base import SEED_BITS

if TYPE_CHECKING:  # the kernels import triton; without a GPU the script only prints a message
    from bitplan.kernels.dequant import PackedWeight

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
BATCHES = (1, 4, 16, 64)
FORMATS = ("int4-g128", "higgs-p2-n256-g128", "higgs-p1-n16-g128", "int3-g128", "higgs-p2-n64-g128")


@dataclass
class LayerCase:
    """One random packed layer on a device, with the functions the benchmark times."""

    fmt: Format
    m: int  # out features
    n: int  # in features
    batch: int
    x: torch.Tensor  # activations [batch, n]
    w: PackedWeight
    had_in: RandomizedHadamard
    had_out: RandomizedHadamard
    read_bytes: int  # what the fused kernel must read
    kernel: Callable[[], torch.Tensor]  # x Wᵀ (the fused kernel alone)
    layer: Callable[[], torch.Tensor]  # the whole layer: rotate in, kernel, rotate out
    fp16: Callable[[], torch.Tensor]  # torch fp16 matmul of the same shape


def kernel_read_bytes(fmt: Format, m: int, n: int, batch: int, act_bytes: int = 2) -> int:
    """Packed codes + scales (+ zeros) + the grid table + the activations, in bytes."""
    packed_bits = fmt.storage_bits(m, n) - (SEED_BITS if fmt.rotated else 0)  # the seeds are not read
    return packed_bits // 8 + fmt.codebook_bits // 8 + batch * n * act_bytes


def layer_case(fmt: Format, m: int, n: int, batch: int, device, dtype=torch.float16, seed: int = 0) -> LayerCase:
    from bitplan.kernels.dequant import PackedWeight
    from bitplan.kernels.hadamard import device_rotation, rotate
    from bitplan.kernels.ops import matmul

    g = torch.Generator(device=device).manual_seed(seed)
    words = fmt.code_words(n)
    groups = fmt.num_groups(n)
    tensors = {"codes": torch.randint(-2**31, 2**31 - 1, (m, words), generator=g, device=device, dtype=torch.int32),
               "scale": (torch.rand(m, groups, generator=g, device=device) * 0.02 + 0.01).half()}
    if fmt.has_zero:
        tensors["zero"] = (torch.rand(m, groups, generator=g, device=device) - 0.5).half() * 0.1
    w = PackedWeight.from_format(fmt, tensors, n)
    had_in, had_out = RandomizedHadamard(n, seed + 1), RandomizedHadamard(m, seed + 2)
    r_in, r_out = device_rotation(had_in, device), device_rotation(had_out, device)
    x = torch.randn(batch, n, generator=g, device=device).to(dtype)
    W16 = torch.randn(m, n, generator=g, device=device, dtype=torch.float16) * 0.02
    x16 = x.half()
    return LayerCase(
        fmt, m, n, batch, x, w, had_in, had_out, kernel_read_bytes(fmt, m, n, batch, x.element_size()),
        kernel=lambda: matmul(x, w),
        layer=lambda: rotate(matmul(rotate(x, r_in), w), r_out, inverse=True),
        fp16=lambda: torch.nn.functional.linear(x16, W16),
    )


def cuda_time_ms(fn) -> float:
    """Median time of fn on the GPU, L2 flushed between runs (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s: (read + write) bytes over the time of one large copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def kernel_table(formats, shapes, batches, device, bandwidth: float, console: Console) -> Table:
    table = Table(title=f"fused dequantize + matmul on {torch.cuda.get_device_name(device)} "
                        f"(copy bandwidth {bandwidth / 1e9:,.0f} GB/s, fp16 activations)")
    for col in ("format", "out × in", "batch", "kernel µs", "GB/s", "% copy BW", "fp16 µs", "speedup", "layer µs"):
        table.add_column(col, justify="left" if col in ("format", "out × in") else "right")
    with console.status("timing kernels (first calls autotune)...") as status:
        for m, n in shapes:
            for fmt in formats:
                for batch in batches:
                    status.update(f"{fmt.name} {m}×{n} batch {batch}")
                    case = layer_case(fmt, m, n, batch, device)
                    t_kernel = cuda_time_ms(case.kernel)
                    t_fp16 = cuda_time_ms(case.fp16)
                    t_layer = cuda_time_ms(case.layer)
                    gbs = case.read_bytes / (t_kernel * 1e-3)
                    table.add_row(fmt.name, f"{m}×{n}", str(batch), f"{t_kernel * 1e3:,.1f}", f"{gbs / 1e9:,.0f}",
                                  f"{100 * gbs / bandwidth:.0f} %", f"{t_fp16 * 1e3:,.1f}",
                                  f"{t_fp16 / t_kernel:.2f}×", f"{t_layer * 1e3:,.1f}")
    return table


def decode_tokens_per_s(model, tokenizer, device, tokens: int) -> float:
    """Greedy batch-1 decode speed with the KV cache, after a warm-up that also autotunes every shape."""
    ids = tokenizer("The history of the union", return_tensors="pt").input_ids.to(device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kw)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - start)


def model_table(spec: str, formats, device, tokens: int, console: Console) -> Table:
    from bitplan.apply import apply_formats, load_quantized
    from bitplan.models import find_linears, load_model

    table = Table(title=f"batch-1 decode of {spec} ({tokens} tokens, fp16 activations, RTN checkpoints)")
    for col in ("weights", "tokens/s", "vs fp16"):
        table.add_column(col, justify="left" if col == "weights" else "right")
    with console.status(f"loading {spec}"):
        lm = load_model(spec)
        fp16 = load_model(spec, dtype=torch.float16).model.to(device)
        base = decode_tokens_per_s(fp16, lm.tokenizer, device, tokens)
        del fp16
    table.add_row("fp16", f"{base:,.1f}", "1.00×")
    names = [info.name for info in find_linears(lm.model)]
    for fmt in formats:
        status = console.status(f"{fmt.name}: quantizing {len(names)} layers (RTN) and decoding")
        with status, tempfile.TemporaryDirectory() as tmp:
            apply_formats(lm, {name: fmt.name for name in names}, f"{tmp}/q", rounding="rtn", progress=False)
            model = load_quantized(f"{tmp}/q").model.to(device, torch.float16)
            tps = decode_tokens_per_s(model, lm.tokenizer, device, tokens)
            del model
        table.add_row(fmt.name, f"{tps:,.1f}", f"{tps / base:.2f}×")
    return table


def _shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kernels_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES), help="out×in, comma-separated")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--model", default="smollm2-135m", help="model for the end-to-end decode table")
    ap.add_argument("--no-model", action="store_true", help="skip the end-to-end decode table")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per end-to-end measurement")
    args = ap.parse_args(argv)
    console = Console()
    if not torch.cuda.is_available():
        console.print("[yellow]kernels_bench measures Triton kernels on a CUDA GPU; this machine has none, so there "
                      "is nothing to measure.[/]")
        return 0
    formats = [get_format(name) for name in args.formats.split(",")]
    shapes = [_shape(s) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    console.print(kernel_table(formats, shapes, batches, device, bandwidth, console))
    if not args.no_model:
        console.print(model_table(args.model, formats, device, args.tokens, console))
    return 0


if __name__ == "__main__":
    sys.exit(main())
