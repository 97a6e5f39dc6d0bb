"""bitplan eval on the real default model (marked tier: CI runs it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitplan.data import token_windows
from bitplan.evaluate import evaluate
from bitplan.models import find_linears, load_model

from tests.conftest import WIKITEXT
from tests.test_evaluate import reference_stats

pytestmark = pytest.mark.model


def test_default_model_against_itself_and_a_noisy_copy(smollm2):
    twin = load_model("smollm2-135m")  # a separate copy: both forwards really run
    same = evaluate(smollm2, twin, str(WIKITEXT), windows=2, seqlen=128, cache=False, progress=False)
    assert abs(same.kl_mean) < 1e-6 and same.top1_agreement == 1.0

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for info in find_linears(twin.model):
            w = twin.model.get_submodule(info.name).weight
            w.add_(torch.randn(w.shape, generator=g) * w.norm() * 0.1 / w.numel() ** 0.5)
    noisy = evaluate(smollm2, twin, str(WIKITEXT), windows=2, seqlen=128, cache=False, progress=False)
    assert noisy.kl_mean > 1e-4 and noisy.top1_agreement < 1.0

    # The reported statistics equal an independent float64 computation over the same windows.
    windows = token_windows(smollm2.tokenizer, str(WIKITEXT), 2, 128, seed=0)
    with torch.inference_mode():
        ref = [smollm2.model(w[None]).logits[0, :-1].float().numpy() for w in windows]
        cand = [twin.model(w[None]).logits[0, :-1].float().numpy() for w in windows]
    targets = np.concatenate([w[1:].numpy() for w in windows])
    expected = reference_stats(np.concatenate(ref), np.concatenate(cand), targets)
    for key in ("kl_mean", "kl_se", "kl_median", "kl_p90", "kl_p99", "kl_max", "top1_agreement",
                "ppl_reference", "ppl_candidate", "rms_dp"):
        assert getattr(noisy, key) == pytest.approx(expected[key], rel=1e-5), key
