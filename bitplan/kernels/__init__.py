"""Triton kernels for bitplan checkpoints: fused dequantize + matmul (GEMV for batch 1, GEMM beyond) for the
integer and grid formats, and the randomized Hadamard rotations they compute in.

    from bitplan.kernels.linear import quantized_matmul   # y = x Wᵀ of a QuantizedLinear, on CUDA
    from bitplan.kernels.ops import qmatmul, hadamard     # torch.library custom ops (torch.compile-able)

Set TRITON_INTERPRET=1 before importing to run them on CPU tensors (slow; what the tests do without a GPU).
"""
