"""Profile on the real default model's weights and tokenizer (marked tier).

To stay well under two minutes on 2 CPU cores, the model keeps its first 4 decoder blocks (28 real layers);
everything else (tokenizer, calibration text, hooks, replay, formats, files) is the full path.
"""
from __future__ import annotations

import hashlib
import json
import lzma

import pandas as pd
import pytest
import torch
from torch import nn

from bitplan.data import text_path
from bitplan.formats import get_format
from bitplan.models import decoder_layers, find_linears
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.profile.defaults import DEFAULT_CHUNK

from tests.conftest import SOTU

FORMATS = "int4-g128,int3-g128,higgs-p2-n64-g128"


@pytest.mark.model
def test_profile_real_weights_end_to_end(smollm2, tmp_path):
    model = smollm2.model
    blocks = decoder_layers(model)
    model.model.layers = nn.ModuleList(list(blocks)[:4])
    model.config.num_hidden_layers = 4
    out = tmp_path / "profile"
    profile = profile_model(smollm2, str(SOTU), samples=4, seqlen=64, seed=0, out_dir=out, noise_samples=2,
                            formats=FORMATS, judge_samples=0, progress=False)
    loaded = load_profile(out)
    assert loaded.to_json() == profile.to_json()
    infos = find_linears(model)
    assert len(loaded.layers) == 28 == len(infos)
    assert loaded.model["weights_sha256"] == profile.model["weights_sha256"]
    assert loaded.calibration["sha256"] == hashlib.sha256(lzma.decompress(text_path(SOTU).read_bytes())).hexdigest()
    assert loaded.calibration["tokens"] == 256
    for r in loaded.layers:
        assert r.alpha_hessian > 0 and r.alpha_noise is not None
        assert r.trace_h_in == pytest.approx(r.trace_h_out, rel=1e-3)     # both are Σ_c ‖G_c‖²
        assert r.rel_err["int3-g128"] > r.rel_err["int4-g128"]
        # after rotation the weights are near-Gaussian: the grid's error is its Gaussian MSE
        assert r.rel_err["higgs-p2-n64-g128"] == pytest.approx(get_format("higgs-p2-n64-g128").mse_q, rel=0.2)
    fits = [r.alpha_noise_r2 for r in loaded.layers if r.alpha_noise_r2 is not None]
    assert sorted(fits)[len(fits) // 2] > 0.9            # ΔKL grows linearly in t² for the typical layer
    df = pd.read_csv(out / "sensitivity.csv")
    assert len(df) == 29 and {"dkl_int4-g128", "dkl_higgs-p2-n64-g128"} <= set(df.columns)
    # the tied embedding: one record for both roles; ΔKL linear in t², and α_noise near α_hessian as for the linears
    (emb,) = loaded.outer_layers
    assert (emb.name, emb.kind, emb.ties, emb.shape) == ("model.embed_tokens", "embedding", ["lm_head"], (49152, 576))
    assert df["kind"].iloc[-1] == "embedding" and df["ties"].iloc[-1] == "lm_head"
    assert emb.alpha_noise_r2 > 0.9 and 0.5 < emb.alpha_noise / emb.alpha_hessian < 2
    f = load_factors(out, infos[-1].name)                  # a down_proj: H_in is 1536 × 1536
    assert f.h_in_a.shape == (1536, 1536) and f.h_out_b.shape == (576, 576)
    assert torch.allclose(f.h_in_a, f.h_in_a.T) and float(torch.linalg.eigvalsh(f.h_in).min()) > -1e-3 * float(f.h_in.diagonal().mean())
    meta = json.loads((out / "profile.json").read_text())
    assert meta["settings"]["sketch_chunk"] == DEFAULT_CHUNK
