"""Model loading and linear-layer discovery (tiny random models; no download)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.models import decoder_layers, find_extras, find_linears, load_model, same_tokenizer, weights_sha256

from tests.conftest import make_tokenizer, tiny_llama


def test_load_folder_and_find_linears(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    linears = find_linears(lm.model)
    assert [l.kind for l in linears[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(linears) == 14 and {l.block for l in linears} == {0, 1}
    by_name = {l.name: l for l in linears}
    k = by_name["model.layers.1.self_attn.k_proj"]
    assert (k.out_features, k.in_features) == (32, 64)  # 2 kv heads × 16
    for info in linears:  # the recorded shape is the module's real weight shape
        assert tuple(lm.model.get_submodule(info.name).weight.shape) == info.shape
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_generic_architecture_names():
    """Not only Llama names: GPT-NeoX has fused query_key_value and dense_h_to_4h projections."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, vocab_size=50))
    kinds = [l.kind for l in find_linears(model) if l.block == 2]
    assert kinds == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    extras = find_extras(model)
    assert [e.kind for e in extras] == ["embedding", "head"] and extras[1].tied_to is None


def test_tied_head_is_reported_as_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=40, tie_word_embeddings=True))
    emb, head = find_extras(model)
    assert emb.name == "model.embed_tokens" and head.name == "lm_head" and head.tied_to == "model.embed_tokens"


def test_gpt2_conv1d_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(BitplanError, match="Conv1D"):
        find_linears(model)


def test_no_quantizable_layers():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.ReLU()]))
    with pytest.raises(BitplanError, match="no quantizable linear layers"):
        find_linears(model)
    assert len(decoder_layers(model)) == 2


def test_decoder_blocks_beat_a_longer_list_inside_them():
    """A block may hold its own ModuleList (experts kept as nn.Linear), longer than the list of blocks."""
    model = tiny_llama(50, layers=2)
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])
    assert decoder_layers(model) is model.model.layers
    del model.config.num_hidden_layers  # without the config's count, the outermost list
    assert decoder_layers(model) is model.model.layers


def test_model_without_causal_lm_head(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(BitplanError, match="no causal-LM head"):
        load_model(str(folder))


@pytest.mark.parametrize("spec, message", [
    ("/no/such/model", "model not found"),
    ("nobody-here/no-such-model-xyz", "not in the local Hugging Face cache|neither in the local"),
])
def test_missing_models(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BitplanError, match=message):
        load_model(spec)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(BitplanError, match="not a .gguf"):
        load_model(str(f))


def test_hub_id_from_local_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout without any network."""
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    tiny_model_dir.rename(snap)
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    lm = load_model("acme/tiny")
    assert lm.path == snap and len(find_linears(lm.model)) == 14


def test_weights_hash_tracks_weights():
    a, b = tiny_llama(100, seed=0), tiny_llama(100, seed=0)
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)


def test_weights_hash_of_a_scalar_buffer():
    """A 0-dim buffer (Gemma 3's embed_scale is one) is hashed like any tensor: its value counts."""
    a, b = tiny_llama(100, seed=0), tiny_llama(100, seed=0)
    a.model.register_buffer("scale", torch.tensor(8.0))
    b.model.register_buffer("scale", torch.tensor(8.0))
    assert weights_sha256(a) == weights_sha256(b)
    b.model.scale.fill_(8.5)
    assert weights_sha256(a) != weights_sha256(b)
    c = tiny_llama(100, seed=0)
    c.model.register_buffer("scale", torch.tensor([8.0]))  # same bytes, another shape
    assert weights_sha256(c) != weights_sha256(a)


def test_same_tokenizer():
    assert same_tokenizer(make_tokenizer(300), make_tokenizer(300))
    assert not same_tokenizer(make_tokenizer(300), make_tokenizer(340))


def test_no_top_level_package_shadows_hf_kernels():
    """transformers ≥ 5 imports Hugging Face's `kernels` package; a top-level `kernels` of ours (the repository root
    is on sys.path under pytest and `python -c`) shadowed it and broke every model load. The name must resolve
    outside this repository, or not at all."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        for place in [spec.origin, *(spec.submodule_search_locations or [])]:
            assert place is None or root not in Path(place).resolve().parents, place
    assert importlib.util.find_spec("bitplan.kernels") is not None
