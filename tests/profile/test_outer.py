"""The token embedding's and the output head's sensitivity: noise injection against direct KL evaluations of the
whole model, and α_hessian against per-window gradients assembled by hand (float64 tiny models)."""
from __future__ import annotations

import copy

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.models import find_outer
from bitplan.profile.noise import NoiseMeter, build_cache
from bitplan.profile.outer import outer_gradients
from bitplan.profile.seeds import generator
from bitplan.profile.sketch import sample_labels
from tests.profile.helpers import tiny_llama, token_ids


def tied(model):
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def direct_kl(model, noisy, ids) -> float:
    """Mean per-token KL(original ‖ noisy) of two whole-model forwards, in float64."""
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(noisy(input_ids=ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# a tied head is no record of its own: the embedding's measurement perturbs both roles
@pytest.mark.parametrize("is_tied, kind", [(False, "embedding"), (False, "head"), (True, "embedding")])
def test_noise_alpha_is_the_slope_of_direct_kl_evaluations(is_tied, kind):
    model = tiny_llama(dtype=torch.float64)
    if is_tied:
        tied(model)
        assert [i.kind for i in find_outer(model)] == ["embedding"]
    info = next(i for i in find_outer(model) if i.kind == kind)
    assert info.ties == (("lm_head",) if is_tied else ())
    ids = token_ids(3, 12)
    levels = (0.001, 0.003)
    meter = NoiseMeter(model, build_cache(model, ids, batch_size=2), levels, seed=0)
    fit = meter.measure(info.name, info.block)
    # the same draw, added by hand to a copy; KL from two whole-model forwards (both roles perturbed if tied)
    W = model.get_submodule(info.name).weight.detach()
    z = torch.randn(W.shape, generator=generator(0, "noise", info.name), dtype=torch.float32).double()
    xs, ys = [], []
    for level in levels:
        noisy = copy.deepcopy(model)
        s = W.norm() * level ** 0.5 / W.numel() ** 0.5
        with torch.no_grad():
            noisy.get_submodule(info.name).weight.add_(s * z)
        if is_tied:
            assert noisy.lm_head.weight is noisy.model.embed_tokens.weight
        xs.append(float((s * z).pow(2).sum() / W.pow(2).sum()))
        ys.append(direct_kl(model, noisy, ids))
    slope = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    assert fit.t2 == pytest.approx(xs, rel=1e-9)
    assert fit.dkl == pytest.approx(ys, rel=1e-6)
    assert fit.alpha == pytest.approx(slope, rel=1e-6) and fit.alpha > 0
    assert fit.r2 > 0.9   # ΔKL grows as t² at small t²
    assert torch.equal(model.get_submodule(info.name).weight, W)   # restored


@pytest.mark.parametrize("is_tied", [False, True])
def test_alpha_hessian_from_per_window_gradients_assembled_by_hand(is_tied):
    model = tiny_llama(dtype=torch.float64)
    if is_tied:
        tied(model)
    infos = find_outer(model)
    ids = token_ids(3, 10)
    got = outer_gradients(model, infos, ids, seed=5)
    emb = model.model.embed_tokens.weight
    V, H = emb.shape
    sq = {"emb": 0.0, "head": 0.0}
    emb_out_sq = head_in_sq = head_out_sq = 0.0
    for k in range(ids.shape[0]):
        x = emb.detach()[ids[k:k + 1]].clone().requires_grad_(True)
        out = model(inputs_embeds=x, output_hidden_states=True)
        logits = out.logits
        logits.retain_grad()
        labels = sample_labels(logits, [k], 5)
        torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum").backward()
        g_emb = torch.zeros(V, H, dtype=torch.float64).index_add_(0, ids[k], x.grad[0])   # one-hot rows
        h_final = out.hidden_states[-1][0].detach()      # after the final norm: what the head reads
        g_head = logits.grad[0].T @ h_final
        if is_tied:
            sq["emb"] += float((g_emb + g_head).pow(2).sum())
        else:
            sq["emb"] += float(g_emb.pow(2).sum())
            sq["head"] += float(g_head.pow(2).sum())
        emb_out_sq += float(x.grad.pow(2).sum())
        head_in_sq += float(h_final.pow(2).sum())
        head_out_sq += float(logits.grad.pow(2).sum())
    tokens = ids.numel()
    names = {"emb": "model.embed_tokens", "head": "lm_head"}
    for role in ("emb",) if is_tied else ("emb", "head"):
        rec = got[names[role]]
        W = model.get_submodule(names[role]).weight.detach()
        alpha = 0.5 * float(W.pow(2).sum()) / W.numel() * sq[role] / tokens
        assert rec["alpha_hessian"] == pytest.approx(alpha, rel=1e-8)
        assert rec["tokens"] == tokens
    assert got["model.embed_tokens"]["trace_h_out"] == pytest.approx(emb_out_sq, rel=1e-8)
    assert got["model.embed_tokens"]["trace_h_in"] == tokens
    assert got["model.embed_tokens"]["rows_seen"] == len(set(ids.reshape(-1).tolist()))
    if not is_tied:
        assert got["lm_head"]["trace_h_in"] == pytest.approx(head_in_sq, rel=1e-8)
        assert got["lm_head"]["trace_h_out"] == pytest.approx(head_out_sq, rel=1e-8)
    assert not emb.requires_grad and emb.grad is None   # the model is left as it was


@pytest.mark.parametrize("is_tied", [False, True])
def test_the_profile_keeps_the_head_input_second_moment_per_half(tmp_path, is_tied):
    """hessians/<half>/<name>.safetensors of the tied embedding (or the untied head) holds Σ h hᵀ of the final
    hidden states over that half's outer windows, equal to a float64 sum from whole-model forwards; an untied
    embedding gets none. A job killed after the outer phase resumes to the same files."""
    from bitplan.profile import profile_model
    from bitplan.profile.defaults import DEFAULT_OUTER_WINDOWS
    from bitplan.profile.directory import ProfileDir
    from bitplan.profile.hessians import HALVES, factors_path, read_half_factors, stored_sides
    from bitplan.profile.inputs import split_halves
    from tests.profile.helpers import Interrupt, stop_at

    model = tiny_llama()
    if is_tied:
        tied(model)
    n = DEFAULT_OUTER_WINDOWS + 4   # the outer windows are the first 32: the last 4 must not count
    ids = token_ids(n, 8)
    kw = dict(out_dir=tmp_path / "prof", sketch_chunk=4, noise_samples=0, formats="int4-g32,fp16", batch_size=4,
              progress=False, judge_samples=0)
    with pytest.raises(Interrupt):
        profile_model(model, ids, **kw, events=stop_at("outer", len(find_outer(model))))
    profile_model(model, ids, **kw)
    owner = "model.embed_tokens" if is_tied else "lm_head"
    split = split_halves(n, 0)
    with torch.no_grad():
        h = model(input_ids=ids[:DEFAULT_OUTER_WINDOWS], output_hidden_states=True).hidden_states[-1].double()
    for half, idx in zip(HALVES, split):
        mine = [k for k in idx if k < DEFAULT_OUTER_WINDOWS]
        x = h[mine].reshape(-1, h.shape[-1])
        sums, meta = read_half_factors(factors_path(tmp_path / "prof", owner, half))
        assert sums.h_out is None and sums.h_in is None and meta["sides"] == "input"
        assert meta["tokens"] == x.shape[0] == sums.tokens and meta["samples"] == len(mine)
        assert torch.allclose(sums.xtx, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))
    assert stored_sides(tmp_path / "prof", owner) == "input"
    if not is_tied:
        assert stored_sides(tmp_path / "prof", "model.embed_tokens") is None
    f = ProfileDir(tmp_path / "prof").factors(owner, "ldlq")
    assert f.one_sided and torch.allclose(f.xtx, h.reshape(-1, h.shape[-1]).T @ h.reshape(-1, h.shape[-1]),
                                          rtol=1e-5, atol=1e-5 * float(f.xtx.abs().max()))
    with pytest.raises(BitplanError, match="only Σxxᵀ"):
        ProfileDir(tmp_path / "prof").factors(owner, "yaqa")
