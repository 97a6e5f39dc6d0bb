"""Bit packing: exact round trip for every width and odd sizes, the documented bit layout, clear errors."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import pack_bits, unpack_bits


def reference_stream(row: list[int], bits: int) -> list[int]:
    """The row as 32-bit words built with Python integers: element k at bit offset k·bits, little-endian."""
    stream = 0
    for k, c in enumerate(row):
        stream |= c << (k * bits)
    n_words = -(-len(row) * bits // 32)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as int32


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("rows, K", [(1, 1), (3, 7), (2, 31), (5, 33), (4, 100), (7, 257)])
def test_round_trip_and_layout(bits, rows, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    codes = torch.randint(0, 1 << bits, (rows, K), generator=g)
    codes[0, 0] = (1 << bits) - 1  # the extremes are always present
    codes[-1, -1] = 0
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-K * bits // 32))
    assert words.tolist() == [reference_stream(r, bits) for r in codes.tolist()]
    back = unpack_bits(words, bits, K)
    assert back.dtype == torch.int32 and torch.equal(back.long(), codes)


def test_accepts_any_integer_dtype():
    codes = torch.tensor([[1, 2, 3, 0, 7]], dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, 5).long(), codes.long())


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_bad_width(bits):
    with pytest.raises(BitplanError, match="1 to 16"):
        pack_bits(torch.zeros(2, 3, dtype=torch.int64), bits)


def test_out_of_range_codes():
    with pytest.raises(BitplanError, match="out of range"):
        pack_bits(torch.tensor([[0, 8]]), 3)
    with pytest.raises(BitplanError, match="out of range"):
        pack_bits(torch.tensor([[-1, 2]]), 3)


def test_bad_inputs():
    with pytest.raises(BitplanError, match="integer"):
        pack_bits(torch.zeros(2, 3), 4)
    with pytest.raises(BitplanError, match="2-D"):
        pack_bits(torch.zeros(6, dtype=torch.int64), 4)
    with pytest.raises(BitplanError, match="words per row"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.int32), 4, 7)
    with pytest.raises(BitplanError, match="int32"):
        unpack_bits(torch.zeros(2, 1, dtype=torch.int64), 4, 7)
