"""`QuantizedLinear` on the kernels: y = x Wᵀ from the packed buffers, without a dense weight.

For a rotated format y = R_m.inverse( R_n.forward(x) @ W_rotᵀ ) (bitplan/apply/module.py), so the path is
three custom ops: hadamard (input side), qmatmul, hadamard⁻¹ (output side). The bias is the caller's.
"""
from __future__ import annotations

import torch

from bitplan.formats import Format

from .dequant import INTERPRETED
from .hadamard import device_rotation
from .ops import ACTIVATION_DTYPES, hadamard, qmatmul


# Grid tables on devices, made once per (format, device). A plain dict rather than functools.lru_cache, which
# torch.compile does not honour (it would trace and bake fmt.codebook() into every graph).
_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(fmt: Format, device: torch.device) -> torch.Tensor:
    key = (fmt.name, device)
    if key not in _LUTS:
        _LUTS[key] = fmt.codebook().to(device).contiguous()
    return _LUTS[key]


def supports(layer, x: torch.Tensor) -> bool:
    """Whether `quantized_matmul` can compute this layer for these activations: an int or grid format,
    float16/bfloat16/float32 activations, on CUDA (or on the CPU under TRITON_INTERPRET=1), and no gradient
    wanted (the ops have no backward; the PyTorch path has)."""
    return (layer.format.kind in ("int", "grid") and x.dtype in ACTIVATION_DTYPES
            and (x.is_cuda or (INTERPRETED and x.device.type == "cpu"))
            and not (x.requires_grad and torch.is_grad_enabled()))


def quantized_matmul(x: torch.Tensor, layer, acc_fp16: bool = False) -> torch.Tensor:
    """x Wᵀ for a QuantizedLinear `layer` (without its bias), in x's dtype; see `supports`."""
    fmt = layer.format
    lut = _lut(fmt, x.device) if fmt.kind == "grid" else None
    zero = layer.zero if fmt.has_zero else None
    if fmt.rotated:
        r_in = device_rotation(layer.had_in, x.device)
        x = hadamard(x, r_in.signs, r_in.dense, r_in.block, False)
    y = qmatmul(x, layer.codes, layer.scale, zero, lut, layer.in_features, fmt.code_bits, fmt.vector_dim,
                fmt.group_size, acc_fp16)
    if fmt.rotated:
        r_out = device_rotation(layer.had_out, x.device)
        y = hadamard(y, r_out.signs, r_out.dense, r_out.block, True)
    return y
