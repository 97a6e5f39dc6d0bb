"""The causal-LM families users bring, as tiny random models built from configs (no download): each goes
profile → solve → apply (YAQA) → load → eval, and what bitplan cannot quantize yet is refused up front.

Each family's parameter id names what sets it apart from Llama: tied or scaled embeddings, extra norms, biases,
fused projections, sliding-window or soft-capped attention, a scalar buffer.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from bitplan.apply import apply_plan, simulate
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.evaluate import evaluate
from bitplan.loading import open_model
from bitplan.models import find_extras, find_linears, load_model, weights_sha256
from bitplan.profile import profile_model
from bitplan.solve import solve

from tests.conftest import make_tokenizer

pytestmark = pytest.mark.architectures

FORMATS = ["int2-g32", "int4-g32"]
LLAMA_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None)
GQA = dict(num_key_value_heads=2, head_dim=16)
SLIDING = 16   # shorter than the 32-token windows below, so the window really cuts attention

# (model_type, config beyond SMALL, the linear kinds of one block, tied embeddings)
FAMILIES = {
    "llama": ("llama", dict(GQA, tie_word_embeddings=False), LLAMA_KINDS, False),
    "mistral-sliding-window": ("mistral", dict(GQA, sliding_window=SLIDING, tie_word_embeddings=False),
                               LLAMA_KINDS, False),
    "qwen2-qkv-bias-tied": ("qwen2", dict(GQA, tie_word_embeddings=True), LLAMA_KINDS, True),
    "qwen3-qk-norm-tied": ("qwen3", dict(GQA, tie_word_embeddings=True), LLAMA_KINDS, True),
    "gemma2-scaled-embedding-tied-extra-norms-sliding-window-softcapped-attention-and-logits": (
        "gemma2", dict(GQA, query_pre_attn_scalar=16, sliding_window=SLIDING, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, tie_word_embeddings=True), LLAMA_KINDS, True),
    "gemma3-scalar-buffer-scaled-embedding-tied-qk-norm-extra-norms-sliding-window": (
        "gemma3_text", dict(GQA, query_pre_attn_scalar=16, sliding_window=SLIDING,
                            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
        LLAMA_KINDS, True),
    "phi3-fused-qkv_proj-fused-gate_up_proj": (
        "phi3", dict(num_key_value_heads=2, original_max_position_embeddings=256, tie_word_embeddings=False),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], False),
    "olmo2-qk-norm-post-norms": ("olmo2", dict(num_key_value_heads=2, tie_word_embeddings=False), LLAMA_KINDS, False),
    "gpt_neox-fused-query_key_value-biases-parallel-residual": (
        "gpt_neox", dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], False),
    "stablelm-layernorm-biases-qkv-bias-partial-rotary": (
        "stablelm", dict(num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25,
                         tie_word_embeddings=False), LLAMA_KINDS, False),
}

# Mixture-of-experts families keep their experts as one 3-D parameter per block (transformers ≥ 5), not nn.Linear.
MOE = {
    "mixtral": ("mixtral", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe-shared-expert": ("qwen2_moe", dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=64)),
    "qwen3_moe": ("qwen3_moe", dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
}


def build(model_type: str, extra: dict, vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **SMALL, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Random init predicts near-uniformly; a larger final norm makes the outputs peaked like a real LM's
        # (Gemma's norms scale by 1 + weight, hence the shift rather than a product).
        norm = model.get_submodule(_final_norm(model)).weight
        if norm.abs().max() == 0:
            norm.add_(7.0)
        else:
            norm.mul_(8.0)
    return model


def _final_norm(model) -> str:
    names = [n for n, _ in model.named_modules()]
    return next(n for n in names if n.rsplit(".", 1)[-1] in ("norm", "final_layer_norm", "final_layernorm"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(family, tokenizer, tiny_text, tmp_path):
    model_type, extra, kinds, tied = FAMILIES[family]
    folder = tmp_path / model_type
    model = build(model_type, extra, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    assert weights_sha256(lm.model) == weights_sha256(model)  # also over any scalar buffer (Gemma's embed_scale)

    # Every block holds exactly the family's linears, each the module transformers built, and nothing else.
    infos = find_linears(lm.model)
    for block in range(2):
        assert Counter(i.kind for i in infos if i.block == block) == Counter(kinds), family
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    assert len(infos) == n_linear - 1  # all but the head (an nn.Linear, tied or not)
    for info in infos:
        assert tuple(lm.model.get_submodule(info.name).weight.shape) == info.shape
    head = find_extras(lm.model)[-1]
    assert (head.tied_to is not None) == tied
    assert any(lm.model.get_submodule(i.name).bias is not None for i in infos) == ("bias" in family)

    prof = profile_model(lm, str(tiny_text), samples=8, seqlen=32, out_dir=tmp_path / "prof", noise_samples=2,
                         formats=FORMATS, judge_samples=0, progress=False)
    assert [r.name for r in prof.layers] == [i.name for i in infos]
    for r in prof.layers:
        assert math.isfinite(r.alpha_noise) and math.isfinite(r.alpha_yaqa) and r.alpha_yaqa > 0, r.name
        assert 0 < r.rel_err["int4-g32"] < r.rel_err["int2-g32"] < 1, r.name

    kl = {}
    for budget in ("3.1bpw", "4.5bpw"):
        plan = solve(tmp_path / "prof", budget)
        plan.save(tmp_path / f"{budget}.json")
        out = tmp_path / f"q{budget}"
        apply_plan(tmp_path / f"{budget}.json", out, model=lm, rounding="yaqa", progress=False)
        loaded = open_model(str(out))
        W_hat = {}
        for name, fmt in plan.formats.items():
            if name not in {i.name for i in infos}:
                continue   # the embedding and head: a bpw plan keeps them fp16, the model's own tensors
            module = loaded.model.get_submodule(name)
            assert isinstance(module, QuantizedLinear) and module.format.name == fmt
            W_hat[name] = module.effective_weight()
            W = lm.model.get_submodule(name).weight
            assert 0 < float((W_hat[name] - W).norm() / W.norm()) < 1, name
        # The loaded checkpoint is the original model with the rounded weights in place: every other tensor
        # (biases, norms, tied or scaled embeddings, buffers) comes back as stored.
        reference = simulate(load_model(str(folder)).model, W_hat)
        ids = torch.tensor([tokenizer(tiny_text.read_text()[:600]).input_ids[:48]])
        with torch.inference_mode():
            a, b = loaded.model(ids).logits, reference(ids).logits
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4, family
        result = evaluate(str(folder), str(out), str(tiny_text), windows=2, seqlen=32, cache=False, progress=False)
        assert result.tokens == 62 and math.isfinite(result.kl_mean) and result.kl_mean > 0
        kl[budget] = result.kl_mean
    assert kl["4.5bpw"] < kl["3.1bpw"], kl


@pytest.mark.parametrize("family", list(MOE))
def test_mixture_of_experts_is_refused_up_front(family, tokenizer, tiny_text, tmp_path):
    """Experts fused into one 3-D parameter are not nn.Linear layers: profile refuses them before any work, in one
    line that names the module."""
    model_type, extra = MOE[family]
    folder = tmp_path / model_type
    model = build(model_type, extra, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    with pytest.raises(BitplanError) as caught:
        profile_model(lm, str(tiny_text), samples=4, seqlen=32, out_dir=tmp_path / "prof", noise_samples=0,
                      formats=FORMATS, judge_samples=0, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unsupported layer model.layers.0.mlp.experts ") and "mixture-of-experts" in message
    assert not (tmp_path / "prof" / "profile.json").exists() and not list(tmp_path.glob("prof/**/*.safetensors"))


def test_profile_command_refuses_experts_in_one_line(tokenizer, tiny_text, tmp_path):
    folder = tmp_path / "mixtral"
    build(*MOE["mixtral"], len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = subprocess.run([sys.executable, "-m", "bitplan", "profile", str(folder), "--calib", str(tiny_text),
                          "--samples", "4", "--seqlen", "32", "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.0.mlp.experts" in lines[0] and "mixture-of-experts" in lines[0], lines


def test_a_weight_matrix_outside_nn_linear_is_refused():
    """A block that multiplies by its own 2-D parameter would be left in full precision without a word."""
    model = build("llama", dict(GQA), 64)
    model.model.layers[1].self_attn.register_parameter("extra", torch.nn.Parameter(torch.zeros(4, 64)))
    with pytest.raises(BitplanError, match=r"^unsupported layer model\.layers\.1\.self_attn \(LlamaAttention\): "
                                           r"its parameter extra is a weight matrix \(4×64\) outside nn\.Linear"):
        find_linears(model)


def test_a_block_without_linears_is_refused_by_name():
    model = build("llama", dict(GQA), 64)
    model.model.layers[0].mlp = torch.nn.Identity()
    model.model.layers[0].self_attn = torch.nn.Identity()
    model.model.layers[1].mlp = torch.nn.Identity()
    model.model.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(BitplanError, match=r"^model\.layers\.0 \(LlamaDecoderLayer\) has no nn\.Linear layer"):
        find_linears(model)
