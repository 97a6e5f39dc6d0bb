"""Noise injection: the fit, the cached replay, the linear regime, and agreement with the factor prediction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitplan.models import decoder_layers, find_linears, get_module
from bitplan.profile.coefficients import rtn_alpha
from bitplan.profile.factors import FactorSums
from bitplan.profile.noise import NoiseMeter, _Tail, build_cache, fit_through_origin, mean_kl, run_from
from bitplan.profile.sketch import accumulate_batch

from tests.profile.helpers import tiny_llama, token_ids


def test_fit_recovers_exact_line():
    x = [0.005, 0.02, 0.06]
    alpha, r2 = fit_through_origin(x, [3.0 * v for v in x])
    assert alpha == pytest.approx(3.0, rel=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_of_a_quadratic_matches_least_squares():
    x = np.array([0.005, 0.02, 0.06])
    y = 2.0 * x + 15.0 * x ** 2   # curvature: the line through the origin is a compromise
    alpha, r2 = fit_through_origin(list(x), list(y))
    ref = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
    assert alpha == pytest.approx(ref, rel=1e-12)
    ss_res = ((y - ref * x) ** 2).sum()
    assert r2 == pytest.approx(1 - ss_res / ((y - y.mean()) ** 2).sum(), rel=1e-12)
    assert r2 < 0.999


def test_replay_from_any_block_reproduces_the_model(tiny32):
    ids = token_ids(3, 16)
    cache = build_cache(tiny32, ids, batch_size=2)
    layers, tail = decoder_layers(tiny32), _Tail(tiny32)
    with torch.no_grad():
        ref = tiny32(input_ids=ids).logits
    for block in range(len(layers)):
        replay = torch.cat([run_from(tiny32, layers, tail, b, block) for b in cache.batches])
        assert torch.allclose(replay, ref, atol=1e-5)
        s, n = mean_kl(torch.cat([b.ref_logprobs for b in cache.batches]), replay)
        assert n == 48 and abs(s / n) < 1e-6


def test_measure_restores_the_weights_exactly(tiny32):
    info = find_linears(tiny32)[3]
    before = get_module(tiny32, info.name).weight.clone()
    meter = NoiseMeter(tiny32, build_cache(tiny32, token_ids(2, 16), 2))
    fit = meter.measure(info.name, info.block)
    assert torch.equal(get_module(tiny32, info.name).weight, before)
    assert len(fit.t2) == len(meter.levels) and all(d > 0 for d in fit.dkl)
    # the realized t² is the nominal level times ‖Z‖²/mn, the same ratio at every level
    ratios = [t / lvl for t, lvl in zip(fit.t2, meter.levels)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) and ratios[0] == pytest.approx(1.0, abs=0.1)


def test_small_noise_is_in_the_linear_regime():
    model = tiny_llama(dtype=torch.float64)
    meter = NoiseMeter(model, build_cache(model, token_ids(2, 16), 2), levels=(1e-4, 4e-4, 1e-3))
    for info in find_linears(model):
        fit = meter.measure(info.name, info.block)
        if fit.alpha > 1e-6:
            assert fit.r2 > 0.99, info.name


@pytest.mark.parametrize("chunk", [12, 1])   # sketch B and per token: α's scale must not depend on the chunk
def test_alpha_hessian_predicts_alpha_noise_in_expectation(chunk):
    """Units and constants: the Fisher trace from the whole windows' gradients with many sampled labels (unbiased
    whatever the chunk the factors are sampled in) against noise injection averaged over several draws, both as
    mean per-token ΔKL per unit t². Per-chunk ‖G_c‖² with T' = 1 would miss the cross-token terms."""
    model = tiny_llama(dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)   # peaked outputs, like a trained LM
    ids = token_ids(2, 12)
    infos = find_linears(model)
    modules = {i.name: get_module(model, i.name) for i in infos}
    sums = {i.name: FactorSums.zeros(i.out_features, i.in_features) for i in infos}
    copies = 100
    rep = ids.repeat(copies, 1)
    for s in range(0, rep.shape[0], 50):  # each copy is another window id: fresh labels for the same text
        accumulate_batch(model, modules, rep[s:s + 50], list(range(s, s + 50)), 0, chunk, sums)
    cache = build_cache(model, ids, 2)
    checked = 0
    for info in infos:
        W = modules[info.name].weight
        f = sums[info.name]
        tr_o, tr_i = float(torch.trace(f.h_out)), float(torch.trace(f.h_in))
        c = f.window_grad_sq / f.tokens / (tr_o * tr_i)
        predicted = rtn_alpha(c, float((W.double() ** 2).sum()), *W.shape, tr_o, tr_i)
        assert predicted == pytest.approx(0.5 * float((W ** 2).sum()) / W.numel() * f.window_grad_sq / f.tokens,
                                          rel=1e-10)
        measured = np.mean([NoiseMeter(model, cache, (1e-4, 3e-4, 1e-3), seed=s).measure(info.name, info.block).alpha
                            for s in range(4)])
        if predicted > 1e-4:
            checked += 1
            assert measured / predicted == pytest.approx(1.0, abs=0.2), info.name
    assert checked >= 6
