"""The judge from the model's own samples: the sampler against an uncached reference, the judged gains against
dense formulas, and the profile's judge phase end to end on a tiny model."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.heldout import rotate_factor
from bitplan.linalg import block_ldl, normalize
from bitplan.models import find_linears, get_module
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.profile.coefficients import layer_coefficients
from bitplan.profile.factors import FactorSums
from bitplan.profile.hessians import LayerFactors, factors_path, read_half_factors
from bitplan.profile.defaults import DEFAULT_JUDGE_SAMPLES
from bitplan.profile.judge import JUDGE, JUDGE_WINDOW_OFFSET, judged_gains, sample_windows, start_token
from bitplan.profile.relerr import rotation_seeds
from bitplan.profile.report import forecast_kl, forecast_ratios
from bitplan.profile.seeds import generator
from bitplan.profile.sketch import accumulate_batch

from tests.profile.helpers import Interrupt, stop_at, tiny_llama, token_ids
from tests.test_linalg import spd

FORMATS = "int4-g32,int3-g64"
KW = dict(sketch_chunk=4, noise_samples=0, formats=FORMATS, batch_size=2, checkpoint_every=2, progress=False)


def test_sampled_windows_are_the_models_own_draws_step_by_step():
    """Each window equals drawing its tokens one at a time from full, uncached forwards of its prefix with the
    window's generator: the KV cache changes nothing, and a window does not depend on the others drawn."""
    model = tiny_llama(dtype=torch.float64)
    got = sample_windows(model, 3, 10, start=5, seed=7)
    assert got.shape == (3, 10) and bool((got[:, 0] == 5).all())
    for w in range(3):
        g, ids = generator(7, "judge", w), [5]
        with torch.inference_mode():
            for _ in range(9):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                ids.append(int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)))
        assert got[w].tolist() == ids
    assert torch.equal(sample_windows(model, 2, 10, start=5, seed=7), got[:2])
    assert not torch.equal(sample_windows(model, 3, 10, start=5, seed=8), got)


def test_samples_follow_the_models_distribution_at_temperature_one():
    """For x drawn from p, E[−log p(x_t | x_<t)] equals E[entropy of p(· | x_<t)] (a known identity): greedy or
    truncated sampling would score far below the entropy, a hotter temperature above it. A peaked model (large
    head weights, as a trained LM) makes the two sides differ a lot for any other sampler."""
    model = tiny_llama(dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    windows = sample_windows(model, 48, 24, start=1, seed=3)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=windows, use_cache=False).logits[:, :-1], -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    diff = (nll - entropy).flatten()
    assert float(entropy.mean()) > 0.5   # peaked, but not deterministic
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / diff.numel() ** 0.5


def test_start_token_prefers_bos_and_says_when_there_is_none():
    model = tiny_llama()
    model.config.bos_token_id, model.config.eos_token_id = 3, 4
    assert start_token(model) == 3
    model.config.bos_token_id = None
    assert start_token(model) == 4
    model.config.eos_token_id = None
    with pytest.raises(BitplanError, match="BOS"):
        start_token(model)


def _dense_side(fit: torch.Tensor, judge: torch.Tensor, lam: float) -> float:
    """tr(L⁻¹ J L⁻ᵀ)/tr J, L from the block LDL of the normalized fit shrunk by λ toward I, by dense inverse."""
    Hf = (1 - lam) * normalize(fit) + lam * torch.eye(fit.shape[0], dtype=torch.float64)
    Linv = torch.linalg.inv(block_ldl(Hf, 16, sigma=0.01).L)
    J = normalize(judge)
    return float(torch.trace(Linv @ J @ Linv.T) / torch.trace(J))


def _sums(h_out, h_in, xtx, grad_sq, samples, tokens, window_sq) -> FactorSums:
    return FactorSums(h_out, h_in, xtx, grad_sq, samples, tokens, window_sq)


def test_judged_gains_fit_both_halves_and_judge_under_the_samples_factors():
    m, n = 32, 64
    name = "model.layers.0.mlp.up_proj"
    halves = [_sums(spd(m, seed=s), spd(n, seed=s + 1), spd(n, seed=s + 2), 3.0, 40, 80, 5.0) for s in (1, 4)]
    a, b = halves
    fit = LayerFactors(name=name, h_out_a=a.h_out, h_in_a=a.h_in, h_out_b=b.h_out, h_in_b=b.h_in, xtx_a=a.xtx,
                       xtx_b=b.xtx, grad_sq_a=3.0, grad_sq_b=3.0, samples_a=40, samples_b=40, tokens_a=80,
                       tokens_b=80, sketch_chunk=1, window_grad_sq_a=5.0, window_grad_sq_b=5.0)
    judge = _sums(spd(m, seed=20, rank=12), spd(n, seed=21), None, 7.0, 64, 64, 9.0)
    got = judged_gains(fit, judge, weight_sq_norm=2.5, shrink_out=0.3, shrink_in=0.1)

    so, si = rotation_seeds(name)
    f_out, f_in, xtx = (rotate_factor(h, s) for h, s in ((a.h_out + b.h_out, so), (a.h_in + b.h_in, si),
                                                          (a.xtx + b.xtx, si)))
    j_out, j_in = rotate_factor(judge.h_out, so), rotate_factor(judge.h_in, si)
    assert got.yaqa_raw == pytest.approx(_dense_side(f_out, j_out, 0.0) * _dense_side(f_in, j_in, 0.0), rel=1e-6)
    assert got.yaqa == pytest.approx(_dense_side(f_out, j_out, 0.3) * _dense_side(f_in, j_in, 0.1), rel=1e-6)
    assert got.ldlq == pytest.approx(_dense_side(xtx, j_in, 0.0), rel=1e-6)
    # the samples' own α_shaped: what the profile computes from factors that are the judge's, split in halves
    half = _sums(judge.h_out / 2, judge.h_in / 2, None, 3.5, 32, 32, 4.5)
    as_profile = LayerFactors(name=name, h_out_a=half.h_out, h_in_a=half.h_in, h_out_b=half.h_out,
                              h_in_b=half.h_in, xtx_a=None, xtx_b=None, grad_sq_a=3.5, grad_sq_b=3.5, samples_a=32,
                              samples_b=32, tokens_a=32, tokens_b=32, sketch_chunk=1, window_grad_sq_a=4.5,
                              window_grad_sq_b=4.5)
    assert got.alpha_shaped == pytest.approx(layer_coefficients(as_profile, 2.5).alpha_shaped, rel=1e-12)
    with pytest.raises(BitplanError, match="no samples"):
        judged_gains(fit, _sums(judge.h_out, judge.h_in, None, 0.0, 0, 0, 0.0), 2.5, 0.0, 0.0)


def run(out, judge_samples=4, ids=None, **kw):
    ids = token_ids(8, 16) if ids is None else ids
    return profile_model(tiny_llama(), ids, out_dir=out, judge_samples=judge_samples, **{**KW, **kw})


def test_profile_judge_accumulates_the_samples_and_judges_every_layer(tmp_path):
    out = tmp_path / "prof"
    profile = run(out)
    assert profile.extra["judge"]["settings"] == {"samples": 4, "seqlen": 16, "seed": 0, "sketch_chunk": 4}
    # the judge's factors are the sketch of the sampled windows, accumulated here independently
    model = tiny_llama()
    infos = find_linears(model)
    windows = sample_windows(model, 4, 16, start_token(model), seed=0)
    sums = {i.name: FactorSums.zeros(i.out_features, i.in_features) for i in infos}
    modules = {i.name: get_module(model, i.name) for i in infos}
    accumulate_batch(model, modules, windows, [JUDGE_WINDOW_OFFSET + w for w in range(4)], 0, 4, sums)
    df = pd.read_csv(out / "sensitivity.csv")
    for k, (info, rec) in enumerate(zip(infos, load_profile(out).layers)):
        saved, meta = read_half_factors(factors_path(out, info.name, JUDGE))
        assert meta["half"] == JUDGE and saved.tokens == 64 and saved.samples == 16
        assert saved.xtx is None and saved.window_grad_sq is None   # judging reads neither
        ref = sums[info.name]   # float32 model, batches of 2 there and of 4 here: agreement to float32 rounding
        for got, want in ((saved.h_out, ref.h_out), (saved.h_in, ref.h_in)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        g = judged_gains(load_factors(out, info.name), saved, rec.weight_sq_norm, rec.extra["shrink_out"] or 0.0,
                         rec.extra["shrink_in"] or 0.0)
        assert rec.extra["yaqa_gain_judged"] == pytest.approx(g.yaqa, rel=1e-12)
        assert rec.extra["yaqa_gain_judged_raw"] == pytest.approx(g.yaqa_raw, rel=1e-12)
        assert rec.extra["ldlq_gain_judged"] == pytest.approx(g.ldlq, rel=1e-12)
        assert df["yaqa_gain_judged"][k] == pytest.approx(g.yaqa, rel=1e-5)
        # the solver's yaqa coefficient: the samples' α_shaped × the judged gain, in the CSV as in the record
        assert rec.alpha_yaqa_judged == pytest.approx(g.alpha_shaped * g.yaqa, rel=1e-12)
        assert df["alpha_yaqa_judged"][k] == pytest.approx(g.alpha_shaped * g.yaqa, rel=1e-5)
        assert df["alpha_ldlq_judged"][k] == pytest.approx(g.alpha_shaped * g.ldlq, rel=1e-5)
    expected = sum(r.extra["alpha_shaped_judge"] * r.rel_err["int3-g64"] * r.extra["yaqa_gain_judged"]
                   for r in profile.layers)
    assert forecast_kl(profile, "int3-g64", "yaqa auto", "samples") == pytest.approx(expected, rel=1e-12)
    ratios = forecast_ratios(profile, "int3-g64", "samples")
    assert ratios["yaqa auto"] == pytest.approx(expected / forecast_kl(profile, "int3-g64", "ldlq", "samples"))
    assert not (out / "hessians" / JUDGE / "samples.jsonl").exists()   # token ids, no tokenizer: nothing to decode


def test_judge_factors_in_groups_of_layers_are_the_same_files(tmp_path):
    """--factor-groups 3 passes the judge's windows once per group of layers, holding one group's sums; every
    layer's judge factors and judged gains are bit for bit those of one pass over all layers."""
    whole = run(tmp_path / "whole")
    calls = []
    grouped = run(tmp_path / "grouped", factor_groups=3, events=lambda p, c: calls.append((p, c)))
    judge_counts = [c for p, c in calls if p == "judge-factors"]
    assert judge_counts == sorted(judge_counts) and judge_counts[-1] == 3 * 4   # 3 groups × 4 windows
    for a, b in zip(whole.layers, grouped.layers):
        assert factors_path(tmp_path / "whole", a.name, JUDGE).read_bytes() == \
            factors_path(tmp_path / "grouped", b.name, JUDGE).read_bytes()
        assert a.extra["yaqa_gain_judged"] == b.extra["yaqa_gain_judged"]


def test_a_finished_profile_asked_for_a_judge_computes_only_the_judge(tmp_path):
    plain = run(tmp_path / "prof", judge_samples=0)
    assert "judge" not in plain.extra and forecast_ratios(plain, "int3-g64", "samples") is None
    calls = []
    judged = run(tmp_path / "prof", events=lambda p, c: calls.append(p))
    assert set(calls) == {"judge-factors", "judge"}
    fresh = run(tmp_path / "fresh")
    for a, b, c in zip(plain.layers, judged.layers, fresh.layers):
        assert b.alpha_yaqa_heldout == a.alpha_yaqa_heldout and b.rel_err == a.rel_err
        assert b.extra["yaqa_gain_judged"] == c.extra["yaqa_gain_judged"]
    calls.clear()
    again = run(tmp_path / "prof", events=lambda p, c: calls.append(p))
    assert calls == [] and again.layers[0].extra["yaqa_gain_judged"] == judged.layers[0].extra["yaqa_gain_judged"]
    run(tmp_path / "prof", judge_samples=6, events=lambda p, c: calls.append(p))   # other judge settings: redone
    assert load_profile(tmp_path / "prof").extra["judge"]["settings"]["samples"] == 6 and "judge" in calls


def test_a_killed_judge_reuses_its_finished_factors_and_a_copied_judge_folder_is_reused(tmp_path):
    run(tmp_path / "prof", judge_samples=0)
    with pytest.raises(Interrupt):
        run(tmp_path / "prof", events=stop_at("judge", 3))
    assert "judge" not in load_profile(tmp_path / "prof").extra   # the profile is as it was
    calls = []
    resumed = run(tmp_path / "prof", events=lambda p, c: calls.append(p))
    assert set(calls) == {"judge"}
    fresh = run(tmp_path / "fresh")
    assert [r.extra["yaqa_gain_judged"] for r in resumed.layers] == [r.extra["yaqa_gain_judged"] for r in fresh.layers]
    # the judge depends only on the model and its own settings: another profile of the model can take the folder
    other = tmp_path / "other"
    run(other, judge_samples=0, ids=token_ids(8, 16, seed=5))
    shutil.copytree(tmp_path / "prof" / "hessians" / JUDGE, other / "hessians" / JUDGE)
    calls.clear()
    judged = run(other, ids=token_ids(8, 16, seed=5), events=lambda p, c: calls.append(p))
    assert set(calls) == {"judge"} and judged.layers[0].extra["yaqa_gain_judged"] != fresh.layers[0].extra[
        "yaqa_gain_judged"]   # the same judge, another fit
    # a judge folder of other settings is not taken
    calls.clear()
    run(other, judge_samples=2, ids=token_ids(8, 16, seed=5), events=lambda p, c: calls.append(p))
    assert "judge-factors" in calls


def test_bad_judge_settings(tmp_path):
    with pytest.raises(BitplanError, match="judge-samples"):
        run(tmp_path / "prof", judge_samples=-1)
    assert not (tmp_path / "prof").exists()


def test_judge_text_is_written_when_the_model_has_a_tokenizer(tmp_path, tiny_model_dir, tiny_text):
    out = tmp_path / "prof"
    profile_model(str(tiny_model_dir), str(tiny_text), samples=4, seqlen=16, out_dir=out, judge_samples=2, **KW)
    lines = (out / "hessians" / JUDGE / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"text"' in line for line in lines)


def test_the_judge_is_on_by_default_when_the_model_names_a_start_token(tmp_path):
    profile = profile_model(tiny_llama(), token_ids(8, 16), out_dir=tmp_path / "prof", **KW)
    assert profile.extra["judge"]["settings"]["samples"] == DEFAULT_JUDGE_SAMPLES
    assert all(r.extra["yaqa_gain_judged"] > 0 for r in profile.layers)
    # a model that names neither BOS nor EOS: no judge by default, and a clear error when one is asked for
    model = tiny_llama()
    model.config.bos_token_id = model.config.eos_token_id = None
    plain = profile_model(model, token_ids(8, 16), out_dir=tmp_path / "nobos", **KW)
    assert "judge" not in plain.extra and "yaqa_gain_judged" not in plain.layers[0].extra
    with pytest.raises(BitplanError, match="--judge-samples 0"):
        profile_model(model, token_ids(8, 16), out_dir=tmp_path / "nobos", judge_samples=2, **KW)
    assert "judge" not in load_profile(tmp_path / "nobos").extra
