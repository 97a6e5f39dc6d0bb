"""Quantization formats: randomized Hadamard rotations, Gaussian vector grids, integer groups, bit packing, and
which formats each serving runtime runs (runtimes.py).

    fmt = get_format("higgs-p2-n256-g128")
    W_rot = rotate_weight(W, seed_out, seed_in)   # grid and int formats expect rotated weights (fmt.rotated)
    qw = fmt.quantize(W_rot); W_hat = unrotate_weight(fmt.dequantize(qw), seed_out, seed_in)
"""
from .base import Format, GroupParams, QuantizedWeight
from .hadamard import RandomizedHadamard, is_supported, rotate_weight, unrotate_weight
from .packing import pack_bits, unpack_bits
from .ggml import GGML_NAMES, GgmlFormat
from .registry import all_formats, default_candidates, get_format, ggml_candidates
from .runtimes import RUNTIMES, runtime_formats, unsupported_reason, vllm_candidates
from .vllm_int import SymIntFormat, ZeroPointIntFormat

__all__ = [
    "Format",
    "GGML_NAMES",
    "GgmlFormat",
    "GroupParams",
    "QuantizedWeight",
    "RUNTIMES",
    "RandomizedHadamard",
    "SymIntFormat",
    "ZeroPointIntFormat",
    "all_formats",
    "default_candidates",
    "get_format",
    "ggml_candidates",
    "is_supported",
    "pack_bits",
    "rotate_weight",
    "runtime_formats",
    "unsupported_reason",
    "unpack_bits",
    "unrotate_weight",
    "vllm_candidates",
]
