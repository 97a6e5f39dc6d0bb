"""Grid formats: RMS group scales, elementwise scaling of p-vectors, padding, tiles, error on Gaussian data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import get_format
from bitplan.formats.grids import grid_metadata, grid_table


def gaussian(m: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fp16_exact(x: torch.Tensor) -> bool:
    return torch.equal(x.to(torch.float16).to(x.dtype), x)


@pytest.mark.parametrize("name, n", [("higgs-p2-n64-g64", 200), ("higgs-p3-n512-g128", 576), ("higgs-p1-n16-g256", 300)])
def test_fit_is_the_fp16_rms_of_each_group_with_a_tail(name, n):
    fmt = get_format(name)
    W = gaussian(6, n, 0) * torch.linspace(0.1, 3.0, 6)[:, None]
    params = fmt.fit(W)
    g = fmt.group_size
    bounds = [(s, min(s + g, n)) for s in range(0, n, g)]
    assert params.scale.shape == (6, len(bounds)) and params.zero is None
    assert fp16_exact(params.scale)
    for j, (a, b) in enumerate(bounds):
        rms = W[:, a:b].double().pow(2).mean(1).sqrt()
        assert torch.equal(params.scale[:, j], rms.to(torch.float16).float())


def reference_dequantize(fmt, W: torch.Tensor) -> torch.Tensor:
    """Written from the definition: per-weight fp16 RMS scale, zero padding, nearest point by brute force."""
    p, n = fmt.vector_dim, W.shape[1]
    C = torch.from_numpy(grid_table(p, fmt.levels).astype(np.float64))
    g = fmt.group_size
    s = torch.empty(W.shape, dtype=torch.float64)
    for a in range(0, n, g):
        b = min(a + g, n)
        s[:, a:b] = W[:, a:b].double().pow(2).mean(1, keepdim=True).sqrt().to(torch.float16).double()
    width = math.ceil(n / p) * p
    z = torch.zeros(W.shape[0], width, dtype=torch.float64)
    z[:, :n] = W.double() / s
    v = z.reshape(-1, p)
    idx = ((v[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    q = C[idx].reshape(W.shape[0], width)[:, :n]
    return (q.float() * s.float())


@pytest.mark.parametrize("name, n", [("higgs-p3-n512-g64", 200), ("higgs-p2-n256-g64", 129),
                                     ("higgs-p4-n256-g128", 321), ("higgs-p1-n8-g64", 100)])
def test_quantize_matches_the_definition(name, n):
    """Vectors straddle group boundaries (scaled elementwise) and the row end (zero padding)."""
    fmt = get_format(name)
    W = gaussian(5, n, 1)
    qw = fmt.quantize(W)
    assert qw.codes.shape == (5, math.ceil(n / fmt.vector_dim)) and qw.codes.dtype == torch.int32
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) < fmt.levels
    assert torch.equal(fmt.dequantize(qw), reference_dequantize(fmt, W))


def test_round_on_tiles_equals_the_slice_of_the_whole():
    fmt = get_format("higgs-p2-n64-g64")
    W = gaussian(32, 256, 2, torch.float64)
    scale, zero = fmt.per_weight(fmt.fit(W.float()), 256)
    full = fmt.round(W, scale, zero)
    assert full.dtype == torch.float64 and zero is None
    assert torch.equal(full, fmt.decode(fmt.encode(W, scale), scale).double())
    tile = fmt.round(W[8:24, 64:128], scale[8:24, 64:128], None)
    assert torch.equal(tile, full[8:24, 64:128])
    batch = torch.stack([W[:16, :48], W[16:, 48:96]])  # a batch of tiles: leading dims are free
    sb = torch.stack([scale[:16, :48], scale[16:, 48:96]])
    out = fmt.round(batch, sb, None)
    assert torch.equal(out[0], full[:16, :48]) and torch.equal(out[1], full[16:, 48:96])
    assert fmt.encode(batch, sb).shape == (2, 16, 24)


@pytest.mark.parametrize("name", ["higgs-p1-n16-g128", "higgs-p2-n256-g128", "higgs-p3-n4096-g128", "higgs-p4-n4096-g64"])
def test_gaussian_error_is_the_grid_mse(name):
    fmt = get_format(name)
    W = gaussian(256, 3072, 3)
    W_hat = fmt.dequantize(fmt.quantize(W))
    t2 = float((W - W_hat).double().pow(2).sum() / W.double().pow(2).sum())
    grid_mse = grid_metadata()["grids"][f"p{fmt.vector_dim}_n{fmt.levels}"]["mse"]
    assert t2 == pytest.approx(grid_mse, rel=0.04)
    assert t2 == pytest.approx(fmt.mse_q, rel=0.03)


@pytest.mark.parametrize("name", ["higgs-p3-n512-g128", "higgs-p4-n64-g128", "higgs-p2-n16-g128", "higgs-p1-n8-g128"])
def test_for_measuring_keeps_the_round_to_nearest_error(name):
    """The profile measures t² with `for_measuring()` (ties settled by the k-d tree): same name, the same error
    as lowest-index ties to float64 rounding, on a width that pads and p-vectors that straddle groups (p = 3)."""
    fmt = get_format(name)
    fast = fmt.for_measuring()
    assert fast.name == fmt.name and not fast.exact_ties and fmt.exact_ties
    W = gaussian(48, 200, 11)
    W[3] = 0  # a zero row: every vector ties between equidistant codes on a symmetric grid
    err = {f: float((W.double() - f.dequantize(f.quantize(W)).double()).pow(2).sum()) for f in (fmt, fast)}
    assert err[fast] == pytest.approx(err[fmt], rel=1e-12)
    assert fast.quantize(W).format == fmt.name


@pytest.mark.parametrize("names", [("higgs-p1-n16-g128", "higgs-p1-n256-g128"),
                                   ("higgs-p3-n128-g128", "higgs-p3-n4096-g128"), ("higgs-p2-n64-g64",)])
def test_one_normalization_rounds_every_grid_of_its_shape_like_quantize(names):
    """The profile normalizes a weight once per (group size, vector dim) and rounds it to each grid from there:
    bit for bit dequantize(quantize(W)), with a tail group and (p = 3) padding to whole vectors."""
    W = gaussian(40, 200, 5)
    W[2] = 0
    fmts = [get_format(n) for n in names] + [get_format(names[0]).for_measuring()]
    nw = fmts[0].normalize(W)
    for f in fmts:
        assert torch.equal(f.round_normalized(nw), f.dequantize(f.quantize(W)))
    other = get_format("higgs-p2-n64-g128" if names[0] != "higgs-p2-n64-g64" else "higgs-p2-n64-g128")
    with pytest.raises(BitplanError, match="normalized for groups"):
        other.round_normalized(get_format("higgs-p4-n64-g128").normalize(W))


def test_non_grid_formats_measure_as_themselves():
    for name in ("int4-g128", "fp16"):
        assert get_format(name).for_measuring() is get_format(name)


def test_zero_rows_and_groups():
    fmt = get_format("higgs-p2-n16-g64")
    W = gaussian(3, 128, 4)
    W[1] = 0
    W[2, :64] = 0
    params = fmt.fit(W)
    assert params.scale[1].eq(0).all() and params.scale[2, 0] == 0
    W_hat = fmt.dequantize(fmt.quantize(W))
    assert torch.isfinite(W_hat).all() and W_hat[1].eq(0).all() and W_hat[2, :64].eq(0).all()


def test_bad_inputs():
    fmt = get_format("higgs-p3-n512-g128")
    W = gaussian(4, 96, 5)
    scale, _ = fmt.per_weight(fmt.fit(W), 96)
    with pytest.raises(BitplanError, match="multiple of the vector size 3"):
        fmt.encode(W[:, :32], scale[:, :32])
    with pytest.raises(BitplanError, match="per-weight scale"):
        fmt.encode(W, scale[:, :48])
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(BitplanError, match="1 NaN"):
        fmt.quantize(bad)
    with pytest.raises(BitplanError, match="fp16 range"):
        fmt.fit(W * 1e6)
