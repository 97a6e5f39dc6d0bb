"""Synthetic profiles with real shapes and format names, for the solver's tests and benchmark.

Coefficients follow what real profiles show: log-normal across layers, rising towards the ends of the stack;
measured t² scatter a few percent around each format's Gaussian mse_q.
"""
from __future__ import annotations

import numpy as np

from ..formats import Format, default_candidates
from ..models import ExtraTensor
from ..profile.schema import LayerRecord, Profile

SMOLLM2_135M = {
    "blocks": 30,
    "shapes": {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
               "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)},
    "vocab": 49152, "hidden": 576,
}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def synthetic_profile(blocks: int = SMOLLM2_135M["blocks"], shapes: dict | None = None,
                      formats: list[Format] | None = None, seed: int = 0, vocab: int = SMOLLM2_135M["vocab"],
                      hidden: int = SMOLLM2_135M["hidden"], tied_head: bool = True,
                      objectives: tuple[str, ...] = ("alpha_noise", "alpha_hessian", "alpha_yaqa_heldout"),
                      measured: float = 1.0) -> Profile:
    """A Profile of `blocks` decoder blocks with `shapes` per projection (default: SmolLM2-135M).

    `measured` is the fraction of (layer, format) pairs with a measured t²; the rest fall back to mse_q."""
    rng = np.random.default_rng(seed)
    shapes = shapes or SMOLLM2_135M["shapes"]
    formats = formats if formats is not None else default_candidates()
    layers = []
    for b in range(blocks):
        depth = b / max(blocks - 1, 1)
        for kind, shape in shapes.items():
            base = float(rng.lognormal(-3.0, 1.0)) * (1.0 + 2.0 * (depth - 0.5) ** 2)
            rec = LayerRecord(name=f"model.layers.{b}.{_PARENT.get(kind, 'mlp')}.{kind}", block=b, kind=kind,
                              shape=tuple(shape), weight_sq_norm=float(shape[0] * shape[1]) * 1e-4)
            for key in objectives:
                setattr(rec, key, base * float(rng.uniform(0.7, 1.3)))
            rec.rel_err = {f.name: f.mse_q * float(rng.uniform(0.95, 1.08)) for f in formats
                           if f.kind != "fp16" and rng.random() < measured}
            layers.append(rec)
    block_params = sum(r.params for r in layers)
    extras = [ExtraTensor(name="model.embed_tokens", kind="embedding", shape=(vocab, hidden)),
              ExtraTensor(name="lm_head", kind="head", shape=(vocab, hidden),
                          tied_to="model.embed_tokens" if tied_head else None)]
    norms = (2 * blocks + 1) * hidden
    n_params = block_params + vocab * hidden * (1 if tied_head else 2) + norms
    return Profile(model={"id": f"synthetic-{blocks}x{len(shapes)}", "weights_sha256": f"synthetic-{seed}",
                          "architecture": "LlamaForCausalLM", "n_params": n_params,
                          "block_linear_params": block_params},
                   calibration={"source": "synthetic"}, formats=[f.name for f in formats], layers=layers,
                   extras=extras)
