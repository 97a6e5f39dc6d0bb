"""apply on the real default model (marked tier): a profile with small calibration, every rounding, loading back."""
from __future__ import annotations

import json

import pytest
import torch

from bitplan.apply import apply_formats, load_quantized, quantize_layer, simulate
from bitplan.data import load_texts
from bitplan.formats import get_format
from bitplan.models import find_linears, load_model
from bitplan.profile import profile_model

from tests.conftest import SOTU, WIKITEXT

pytestmark = pytest.mark.model


def test_default_model_roundings_and_loaded_logits(smollm2, tmp_path):
    """Blocks 0-1 of the default model with a 4-window profile: YAQA's and LDLQ's in-sample proxies beat
    round-to-nearest's on every layer, and the loaded checkpoint's logits equal the simulated model's to 1e-4."""
    names = [i.name for i in find_linears(smollm2.model) if i.block < 2]
    prof = tmp_path / "prof"
    profile_model(smollm2, str(SOTU), samples=4, seqlen=64, out_dir=prof, noise_samples=0,
                  formats=["int3-g128"], judge_samples=0, progress=False)
    formats = {n: "int3-g128" for n in names}
    for rounding in ("yaqa", "ldlq"):
        result = apply_formats(smollm2, formats, tmp_path / rounding, rounding=rounding, profile_dir=prof,
                               progress=False)
        for n in names:
            st = result.stats[n]
            assert st["proxy"] < st["proxy_rtn"], (rounding, n)
    qc = json.loads((tmp_path / "yaqa" / "config.json").read_text())["quantization_config"]
    assert all(0.0 <= qc["layers"][n][side] <= 1.0 for n in names for side in ("shrink_out", "shrink_in"))

    loaded = load_quantized(tmp_path / "yaqa")
    reference = load_model("smollm2-135m")
    W_hat = {}
    for n in names:
        from bitplan.profile.hessians import load_factors

        f = load_factors(prof, n)
        W_hat[n] = quantize_layer(n, smollm2.model.get_submodule(n).weight, get_format("int3-g128"), "yaqa",
                                  f.h_in, f.h_out, shrink_out=qc["layers"][n]["shrink_out"],
                                  shrink_in=qc["layers"][n]["shrink_in"], target=qc["layers"][n]["shrink_target"]).W_hat
    simulate(reference.model, W_hat)
    ids = torch.tensor([smollm2.tokenizer(load_texts(WIKITEXT)[0][:2000]).input_ids[:96]])
    with torch.inference_mode():
        a, b = loaded.model(ids).logits, reference.model(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
