"""`QuantizedLinear` on the kernels: y = x Wᵀ from the packed buffers, without a dense weight.

For a rotated format y = R_m.inverse( R_n.forward(x) @ W_rotᵀ ) (bitplan/apply/module.py), so the path is
three custom ops: hadamard (input side), qmatmul, hadamard⁻¹ (output side). The bias is the caller's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dequant import INTERPRETED
from .hadamard import device_rotation
from .ops import ACTIVATION_DTYPES, hadamard, qmatmul


@dataclass(frozen=True)
class LayerTables:
    """The constant tensors a layer computes with besides its buffers, on one device."""

    lut: torch.Tensor | None  # grid table, float32 [levels, p]
    signs_in: torch.Tensor | None  # rotation of the input side: float32 signs [n] and Had_K (Kronecker plans)
    dense_in: torch.Tensor | None
    signs_out: torch.Tensor | None  # rotation of the output side
    dense_out: torch.Tensor | None


_CACHE = "_triton_tables"  # attribute of the layer: {device: LayerTables}


@torch.compiler.disable
def _build_tables(layer, device: torch.device) -> LayerTables:
    """Made once per layer and device, eagerly: torch.compile cannot trace the construction (package data,
    Paley finite-field arithmetic), so a first call under compile breaks the graph here once."""
    fmt = layer.format
    r_in = device_rotation(layer.had_in, device) if fmt.rotated else None
    r_out = device_rotation(layer.had_out, device) if fmt.rotated else None
    tables = LayerTables(lut=fmt.codebook().to(device).contiguous() if fmt.kind == "grid" else None,
                         signs_in=r_in.signs if r_in else None, dense_in=r_in.dense if r_in else None,
                         signs_out=r_out.signs if r_out else None, dense_out=r_out.dense if r_out else None)
    layer.__dict__.setdefault(_CACHE, {})[device] = tables
    return tables


def layer_tables(layer, device: torch.device) -> LayerTables:
    """The layer's tables on `device`; a plain lookup after the first call (what a compiled graph sees)."""
    tables = layer.__dict__.get(_CACHE, {}).get(device)
    return tables if tables is not None else _build_tables(layer, device)


def supports(layer, x: torch.Tensor) -> bool:
    """Whether `quantized_matmul` can compute this layer for these activations: an int or grid format,
    float16/bfloat16/float32 activations, on CUDA (or on the CPU under TRITON_INTERPRET=1), and no gradient
    wanted (the ops have no backward; the PyTorch path has). ggml's block types are not covered."""
    return (layer.format.kind in ("int", "grid") and x.dtype in ACTIVATION_DTYPES
            and (x.is_cuda or (INTERPRETED and x.device.type == "cpu"))
            and not (x.requires_grad and torch.is_grad_enabled()))


def quantized_matmul(x: torch.Tensor, layer, acc_fp16: bool = False) -> torch.Tensor:
    """x Wᵀ for a QuantizedLinear `layer` (without its bias), in x's dtype; see `supports`."""
    fmt = layer.format
    t = layer_tables(layer, x.device)
    zero = layer.zero if fmt.has_zero else None
    if fmt.rotated:
        x = hadamard(x, t.signs_in, t.dense_in, layer.had_in.plan.block, False)
    y = qmatmul(x, layer.codes, layer.scale, zero, t.lut, layer.in_features, fmt.code_bits, fmt.vector_dim,
                fmt.group_size, acc_fp16)
    if fmt.rotated:
        y = hadamard(y, t.signs_out, t.dense_out, layer.had_out.plan.block, True)
    return y
