"""The shared dequantize routine: bit-exact against bitplan's unpack + dequantize, every field width."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import get_format, pack_bits, unpack_bits
from bitplan.kernels.dequant import PackedWeight, dequantize

from .helpers import kernel_formats, quantized_layer, sampled_formats


@pytest.mark.parametrize("fmt", kernel_formats(), ids=lambda f: f.name)
def test_dequantize_equals_reference(fmt, device):
    """Odd shape: m odd, n neither a multiple of the group, of the tile, nor (p = 3) of the vector size."""
    w, ref = quantized_layer(fmt, 19, 200, device)
    for block_k in (64, 256):  # tiles inside one group (a scale per row), and tiles spanning groups (gathered)
        out = dequantize(w, block_k=block_k)
        assert out.dtype == torch.float32 and out.shape == (19, 200)
        assert torch.equal(out.cpu(), ref.float())


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_field_width_unpacks(bits, device):
    """Codes of every width 1..16, fields straddling words included: with scale 1 and zero 0 the weight is
    the code itself, which must match the reference unpacking."""
    m, n = 5, 97
    codes = torch.randint(0, 1 << bits, (m, n), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    codes[0, :] = (1 << bits) - 1  # all ones: sign bits of every word set
    words = pack_bits(codes, bits)
    ones = torch.ones(m, 1, dtype=torch.float16)
    w = PackedWeight(words.to(device), ones.to(device), torch.zeros_like(ones).to(device), None, n, bits, 1, 128)
    out = dequantize(w, block_n=4, block_k=32)
    assert torch.equal(out.cpu(), unpack_bits(words, bits, n).float())


def test_packed_weight_checks_shapes(device):
    fmt = get_format("int4-g128")
    w, _ = quantized_layer(fmt, 8, 64, device)
    tensors = {"codes": w.codes[:, :-1].contiguous(), "scale": w.scale, "zero": w.zero}
    with pytest.raises(BitplanError, match="packed codes"):
        PackedWeight.from_format(fmt, tensors, 64)
    with pytest.raises(BitplanError, match="int and grid formats"):
        PackedWeight.from_format(get_format("fp16"), tensors, 64)


def test_sample_covers_every_code_width_and_vector_size():
    """The formats the slower tests sample still cover every code width and every p of the default set."""
    full = kernel_formats()
    sample = sampled_formats()
    assert {f.code_bits for f in sample} == {f.code_bits for f in full}
    assert {(f.kind, f.vector_dim) for f in sample} == {(f.kind, f.vector_dim) for f in full}
    assert all(f in full for f in sample)
