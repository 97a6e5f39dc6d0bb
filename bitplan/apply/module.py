"""`QuantizedLinear`: a linear layer that computes from a bitplan checkpoint's packed weights.

For a rotated format the stored weight is W_rot = R_m W R_nᵀ, so y = x Wᵀ = R_mᵀ-applied((R_n x) W_rotᵀ):
the input is rotated, multiplied with the dequantized rotated weight, and the output rotated back. This is the
PyTorch path, for every device. With `cache=False` it keeps only the packed bytes and dequantizes on every call;
with `cache=True` (the default) it dequantizes once and keeps the weight in the original basis, R_mᵀ W_rot R_n,
so a forward is one plain matmul (the rotations of every call cost more than the matmul itself on a CPU).
On CUDA, int and grid formats go through the Triton kernels (bitplan/kernels/linear.py) instead when triton is installed.
Unrotated formats (fp16, ggml's block types: one uint8 `blocks` tensor, no rotation seeds) dequantize and multiply.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..formats import RandomizedHadamard, get_format


def encode_seeds(seed_out: int, seed_in: int) -> torch.Tensor:
    """Two unsigned 64-bit seeds stored bit-for-bit in an int64 tensor (safetensors has no uint64)."""
    return torch.from_numpy(np.array([seed_out, seed_in], dtype=np.uint64).view(np.int64))


def decode_seeds(t: torch.Tensor) -> tuple[int, int]:
    seed_out, seed_in = t.numpy().view(np.uint64).tolist()
    return int(seed_out), int(seed_in)


def _triton_matmul(layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor | None:
    """x Wᵀ through the Triton kernels (bitplan/kernels/linear.py) where they cover the layer; None without triton."""
    try:
        from bitplan.kernels.linear import quantized_matmul, supports  # lazy: CPU users never need triton
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return None
    return quantized_matmul(x, layer) if supports(layer, x) else None


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, format_name: str, packed: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, codebook: torch.Tensor | None = None, cache: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = get_format(format_name)
        self.cache = cache
        for key, value in packed.items():
            self.register_buffer(key, value.clone())
        self.bias = nn.Parameter(bias.clone(), requires_grad=False) if bias is not None else None
        self._packed_keys = tuple(k for k in packed if k != "rotation_seeds")
        if self.format.rotated:
            seed_out, seed_in = decode_seeds(packed["rotation_seeds"])
            self.had_in = RandomizedHadamard(in_features, seed_in)
            self.had_out = RandomizedHadamard(out_features, seed_out)
        self._weight: torch.Tensor | None = None
        self._effective: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies with: rotated basis for rotated formats, float32 [out, in]."""
        if self._weight is not None:
            return self._weight
        if self.format.kind == "fp16":
            W = self.weight_fp16().float()
        else:
            tensors = {k: getattr(self, k) for k in self._packed_keys}
            W = self.format.dequantize(self.format.unpack(tensors, self.out_features, self.in_features)).float()
        if self.cache:
            self._weight = W
        return W

    def weight_fp16(self) -> torch.Tensor:
        return getattr(self, "weight")

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original basis (what a dense nn.Linear would hold), float32."""
        if self._effective is not None:
            return self._effective
        W = self.dequantized_weight()
        if self.format.rotated:
            W = self.had_in.inverse(self.had_out.inverse(W.double(), dim=0), dim=1).float()  # R_mᵀ W_rot R_n
        if self.cache:
            self._effective, self._weight = W, None
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _triton_matmul(self, x) if x.is_cuda else None
        if y is None and self.cache:
            y = x @ self.effective_weight().to(x.dtype).T
        elif y is None:
            W = self.dequantized_weight().to(x.dtype)
            if self.format.rotated:
                y = self.had_out.inverse(self.had_in.forward(x) @ W.T)
            else:
                y = x @ W.T
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format.name}"
