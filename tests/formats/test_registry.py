"""Format names and attributes, unknown names, the default candidates, exact storage accounting, pack/unpack."""
from __future__ import annotations

import math

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import Format, all_formats, default_candidates, get_format
from bitplan.formats.base import SEED_BITS


def test_catalogue():
    fmts = all_formats()
    names = [f.name for f in fmts]
    assert len(names) == len(set(names)) == (7 + 10 + 9 + 7) * 3 + 3 * 7 * 3 + 12 + 1   # grids, int/sint/uint, ggml, fp16
    for f in fmts:
        assert isinstance(f, Format) and get_format(f.name) is f
        assert f.kind in {"grid", "int", "sint", "uint", "ggml", "fp16"} and f.mse_q > 0 and math.isfinite(f.mse_q)


@pytest.mark.parametrize("name, kind, bits, g, p, code_bits, rotated, codebook_bits", [
    ("higgs-p2-n256-g128", "grid", 4.0, 128, 2, 8, True, 256 * 2 * 32),
    ("higgs-p3-n4096-g64", "grid", 4.0, 64, 3, 12, True, 4096 * 3 * 32),
    ("higgs-p4-n64-g256", "grid", 1.5, 256, 4, 6, True, 64 * 4 * 32),
    ("higgs-p1-n16-g128", "grid", 4.0, 128, 1, 4, True, 16 * 32),
    ("int3-g128", "int", 3.0, 128, 1, 3, True, 0),
    ("int8-g32", "int", 8.0, 32, 1, 8, True, 0),
    ("sint3-g64", "sint", 3.0, 64, 1, 3, False, 0),
    ("uint8-g128", "uint", 8.0, 128, 1, 8, False, 0),
    ("fp16", "fp16", 16.0, 0, 1, 16, False, 0),
])
def test_attributes(name, kind, bits, g, p, code_bits, rotated, codebook_bits):
    f = get_format(name)
    assert (f.name, f.kind, f.group_size, f.vector_dim, f.code_bits, f.rotated, f.codebook_bits) == \
        (name, kind, g, p, code_bits, rotated, codebook_bits)
    assert f.nominal_bits == pytest.approx(bits)


@pytest.mark.parametrize("bad, suggestion", [
    ("higgs-p2-n256-g129", "higgs-p2-n256-g128"),
    ("int9-g128", "int8-g128"),
    ("int4g128", "int4-g128"),
    ("fp32", "fp16"),
    ("higgs-p2-n255-g128", "higgs-p2-n256-g128"),
])
def test_unknown_names_suggest_the_nearest(bad, suggestion):
    with pytest.raises(BitplanError, match="unknown format") as e:
        get_format(bad)
    assert suggestion in str(e.value)


@pytest.mark.parametrize("bad", ["", "higgs", 42, None, "higgs-p5-n256-g128", "int4-g100", "higgs-p1-n512-g128"])
def test_invalid_names(bad):
    with pytest.raises(BitplanError, match="Valid names"):
        get_format(bad)


def test_default_candidates():
    cands = default_candidates()
    assert 25 <= len(cands) <= 40
    bpw = {f.name: f.bits_per_weight(4096, 4096) for f in cands}
    quantized = [v for k, v in bpw.items() if k != "fp16"]
    assert 1.55 <= min(quantized) <= 1.7 and 8.2 <= max(quantized) <= 8.4
    assert "fp16" in bpw and {f.vector_dim for f in cands if f.kind == "grid"} == {1, 2, 3, 4}
    assert all(f.group_size == 128 for f in cands if f.kind == "grid")
    assert {f.name for f in cands if f.kind == "int"} >= {f"int{b}-g128" for b in range(2, 9)} | {"int4-g64"}
    assert list(bpw.values()) == sorted(bpw.values())


def test_bits_per_weight_counts_tail_groups_and_seeds():
    f = get_format("int3-g128")  # 576 = 4·128 + 64: five groups of (scale, zero) per row
    assert f.storage_bits(576, 576) == 576 * 576 * 3 + 576 * 5 * 32 + SEED_BITS
    assert f.bits_per_weight(576, 576) == pytest.approx(3 + 160 / 576 + 128 / 576**2)
    assert round(f.bits_per_weight(576, 576), 2) == 3.28  # not 3.25
    h = get_format("higgs-p2-n256-g128")
    assert h.bits_per_weight(4096, 4096) == pytest.approx(4 + 16 / 128 + 128 / 4096**2)
    assert get_format("fp16").bits_per_weight(3, 5) == 16


SHAPES = [(1, 1), (3, 577), (5, 129), (4, 576), (2, 1000)]
SAMPLE = ["higgs-p1-n4-g64", "higgs-p1-n256-g256", "higgs-p2-n8-g64", "higgs-p2-n4096-g128", "higgs-p3-n512-g128",
          "higgs-p3-n4096-g256", "higgs-p4-n64-g64", "higgs-p4-n2048-g128", "int2-g32", "int3-g128", "int5-g64",
          "int8-g128", "fp16"]


@pytest.mark.parametrize("name", SAMPLE)
@pytest.mark.parametrize("m, n", SHAPES)
def test_pack_round_trip_and_exact_storage(name, m, n):
    f = get_format(name)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n))
    qw = f.quantize(W)
    tensors = f.pack(qw)
    written = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert f.storage_bits(m, n) == written + (SEED_BITS if f.rotated else 0)
    back = f.unpack(tensors, m, n)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.params.scale, qw.params.scale)
    assert (back.params.zero is None) == (qw.params.zero is None)
    if qw.params.zero is not None:
        assert torch.equal(back.params.zero, qw.params.zero)
    assert torch.equal(f.dequantize(back), f.dequantize(qw))


def test_unpack_rejects_wrong_tensors():
    f = get_format("int4-g64")
    t = f.pack(f.quantize(torch.randn(4, 100)))
    with pytest.raises(BitplanError, match="needs tensors"):
        f.unpack({"codes": t["codes"], "scale": t["scale"]}, 4, 100)
    with pytest.raises(BitplanError, match="packed codes"):
        f.unpack(t, 4, 200)
    with pytest.raises(BitplanError, match="not int4-g64"):
        f.dequantize(get_format("int4-g128").quantize(torch.randn(2, 8)))


@pytest.mark.parametrize("name", ["higgs-p2-n64-g128", "int4-g128", "fp16"])
@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_weights(name, value, word):
    W = torch.randn(4, 64)
    W[2, 7] = value
    with pytest.raises(BitplanError, match=f"1 {word}"):
        get_format(name).quantize(W)


def test_bad_shapes():
    with pytest.raises(BitplanError, match="2-D"):
        get_format("int4-g128").quantize(torch.randn(8))
    with pytest.raises(BitplanError, match="floating"):
        get_format("int4-g128").quantize(torch.ones(2, 2, dtype=torch.int64))
