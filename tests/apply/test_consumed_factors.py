"""Apply's rounding in the factors' own buffers (`consume_factors`, `rounding_factors`) against the copying path:
the same codes, weights and statistics, bit for bit."""
from __future__ import annotations

import pytest
import torch

from bitplan.apply.layer import quantize_layer
from bitplan.apply.run import rounding_factors
from bitplan.formats import get_format


def _factor(k: int, seed: int) -> torch.Tensor:
    X = torch.randn(k, k + 5, generator=torch.Generator().manual_seed(seed))
    H = (X @ X.T).double()
    H[2, :] = H[:, 2] = 0.0         # an input no token reaches
    H[4, 7] = -H[4, 7]              # a float32 file's slight asymmetry
    return H


def test_rounding_factors_are_the_halves_sums(tmp_path):
    """The summed factors read one tensor at a time equal load_factors' sums of the two float64 halves."""
    from bitplan.profile.directory import ProfileDir
    from bitplan.profile.factors import FactorSums
    from bitplan.profile.hessians import factors_path, load_factors, save_half_factors

    name = "model.layers.0.mlp.down_proj"
    for half, seed in (("a", 1), ("b", 4)):
        sums = FactorSums(_factor(32, seed).float(), _factor(96, seed + 1).float(), _factor(96, seed + 2).float(),
                          1.0, 4, 512, None)
        path = factors_path(tmp_path, name, half)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_half_factors(path, name, half, sums, 0)
    ref = load_factors(tmp_path, name)
    H_in, H_out, one_sided = rounding_factors(ProfileDir(tmp_path), name, "yaqa", (32, 96))
    assert torch.equal(H_in, ref.h_in) and torch.equal(H_out, ref.h_out) and not one_sided
    assert H_in.dtype == torch.float64
    H_in, H_out, _ = rounding_factors(ProfileDir(tmp_path), name, "ldlq", (32, 96))
    assert torch.equal(H_in, ref.xtx) and H_out is None
    assert ProfileDir(tmp_path).factor_samples(name) == ref.samples == 8


@pytest.mark.parametrize("fmt,rounding,lam,target", [
    ("int4-g128", "yaqa", 0.0, "identity"), ("higgs-p2-n64-g128", "yaqa", 0.2, "identity"),
    ("higgs-p3-n512-g128", "yaqa", 0.3, "diagonal"), ("int3-g64", "ldlq", 0.0, "identity"),
    ("q4_K", "yaqa", 0.1, "diagonal")])
def test_consumed_factors_round_bit_for_bit_as_copied_ones(fmt, rounding, lam, target):
    W = torch.randn(32, 96 if fmt != "q4_K" else 256, generator=torch.Generator().manual_seed(9))
    n = W.shape[1]
    Hi, Ho = _factor(n, 2), _factor(32, 3) if rounding == "yaqa" else None
    kw = dict(shrink_out=lam, shrink_in=lam / 2, target=target)
    ref = quantize_layer("model.layers.0.mlp.down_proj", W, get_format(fmt), rounding, Hi, Ho, **kw)
    assert torch.equal(Hi, _factor(n, 2)), "the copying path leaves its factors alone"
    got = quantize_layer("model.layers.0.mlp.down_proj", W, get_format(fmt), rounding, Hi.clone(),
                         Ho.clone() if Ho is not None else None, consume_factors=True, **kw)
    assert ref.tensors.keys() == got.tensors.keys()
    for k in ref.tensors:
        assert torch.equal(ref.tensors[k], got.tensors[k]), k
    assert torch.equal(ref.W_hat, got.W_hat) and ref.stats == got.stats


@pytest.mark.parametrize("seed,lam,target", [(None, 0.0, "identity"), (11, 0.0, "identity"), (11, 0.25, "identity"),
                                             (12, 0.4, "diagonal"), (None, 0.3, "diagonal")])
def test_prepared_factor_is_heldouts_rotate_normalize_shrink(seed, lam, target):
    """In its own buffer, the same bits as heldout's rotate_factor → normalized_pair → shrink (the profile's way)."""
    from bitplan.apply.layer import prepare_factor, prepared_factor
    from bitplan.heldout import normalized_pair, rotate_factor, rotated_target, shrink
    from bitplan.linalg import block_ldl

    H = _factor(96, 7)
    Hn, T = normalized_pair(rotate_factor(H, seed), rotated_target(H, seed, target) if lam else None)
    ref = shrink(Hn, lam, T)
    got = prepared_factor(H.clone(), seed, lam, target, consume=True)
    assert torch.equal(got, ref)
    ldl = prepare_factor(H.clone(), seed, 16, lam, "a layer", target, consume=True)
    assert torch.equal(ldl.L, block_ldl(ref, 16).L)


@pytest.mark.parametrize("n", [96, 576, 512])
def test_rotation_in_blocks_is_the_whole_matrix_rotation(n):
    """rotate_in_place, a few columns then rows at a time, gives heldout.rotate_factor's bits."""
    from bitplan.formats.hadamard import RandomizedHadamard, rotate_in_place
    from bitplan.heldout import rotate_factor

    H, had = _factor(n, 8), RandomizedHadamard(n, 5)
    assert torch.equal(rotate_in_place(H.clone(), had, had, block_bytes=8 * n * 7), rotate_factor(H, 5))
