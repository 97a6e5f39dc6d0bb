"""`bitplan export gguf` on tiny random Llamas: every tensor read back by the gguf package equals the checkpoint's
own dequantized weight, transformers runs the file with the checkpoint's logits, refusals are one clear line."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bitplan.apply import apply_formats, load_quantized
from bitplan.apply.embedding import QuantizedEmbedding
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.export import export_gguf
from bitplan.models import find_linears, load_model

T = gguf.GGMLQuantizationType
# hidden 256 and intermediate 512: rows long enough for the 256-weight super-block types
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# every ggml type at least once, K-types on the q/k projections (their rows are reordered), one fp16 module
MIX = ["q4_K", "q6_K", "q8_0", "iq4_xs", "q2_K", "q3_K", "q5_K",
       "q4_0", "iq4_nl", "q4_1", "q5_0", "fp16", "q5_1", "q4_K"]


def build(tmp_path, tokenizer, tied: bool, embedding: str | None = None, mix=MIX):
    """A tiny Llama folder and its checkpoint with the block linears in `mix` (and the embedding in
    `embedding` when given), rounded to nearest."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(tokenizer),
                         max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):   # norms away from 1 so that a misplaced norm shows
                p.uniform_(0.5, 1.5)
    folder = tmp_path / f"tiny-{'tied' if tied else 'untied'}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    formats = {info.name: mix[i % len(mix)] for i, info in enumerate(find_linears(lm.model))}
    if embedding:
        formats["model.embed_tokens"] = embedding
    out = tmp_path / f"q-{folder.name}"
    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    return folder, out, formats


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, index by index: the row of head h, half j, pair i (original position
    h·d + j·d/2 + i) sits at h·d + 2i + j in the GGUF."""
    d = rows.shape[0] // n_head
    original = np.empty_like(rows)
    for h in range(n_head):
        for j in range(2):
            for i in range(d // 2):
                original[h * d + j * d // 2 + i] = rows[h * d + 2 * i + j]
    return original


def read_back(path):
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, np.asarray(W, dtype=np.float32).reshape([int(x) for x in t.shape[::-1]]))
    return reader, out


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens":
        return "token_embd.weight"
    if hf == "lm_head":
        return "output.weight"
    block = hf.split(".")[2]
    part = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[hf.rsplit(".", 1)[1]]
    return f"blk.{block}.{part}.weight"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tensors_equal_the_checkpoint(tmp_path, tiny_tokenizer, tied):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, tied)
    path = tmp_path / "model.gguf"
    result = export_gguf(ckpt, path, embedding_type="f16", output_type="f16", progress=False)
    loaded = load_quantized(ckpt, cache=False).model
    reader, tensors = read_back(path)
    expected_names = {gguf_name(n) for n in formats} | {"token_embd.weight", "output_norm.weight"} | \
        {f"blk.{b}.{n}.weight" for b in range(LAYERS) for n in ("attn_norm", "ffn_norm")} | \
        (set() if tied else {"output.weight"})
    assert set(tensors) == expected_names
    for name, fmt in formats.items():
        qtype, W = tensors[gguf_name(name)]
        module = loaded.get_submodule(name)
        assert qtype == (T.F16 if fmt == "fp16" else T[fmt.upper()]), name
        if name.endswith(("q_proj", "k_proj")):
            W = unpermute(W, HEADS if name.endswith("q_proj") else KV_HEADS)
        reference = module.effective_weight() if isinstance(module, QuantizedLinear) else module.weight
        assert np.array_equal(W, reference.detach().float().numpy()), name
    state = loaded.state_dict()
    assert np.array_equal(tensors["token_embd.weight"][1], state["model.embed_tokens.weight"].numpy())
    for b in range(LAYERS):
        for gname, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            qtype, w = tensors[f"blk.{b}.{gname}.weight"]
            assert qtype == T.F32 and np.array_equal(w, state[f"model.layers.{b}.{hf}.weight"].numpy())
    if not tied:
        assert np.array_equal(tensors["output.weight"][1], state["lm_head.weight"].numpy())
    # the packed blocks are the checkpoint's bytes (rows reordered on q/k only)
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "model.safetensors"))
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    v = "model.layers.0.self_attn.v_proj"
    assert np.array_equal(raw[gguf_name(v)].reshape(stored[f"{v}.blocks"].shape), stored[f"{v}.blocks"].numpy())
    # the accounting: block linears' bits are their stored bytes
    linear_bytes = sum(t.nbytes for t in result.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    assert result.block_linear_bits == 8 * linear_bytes
    assert result.file_bytes == path.stat().st_size


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_runs_the_file_with_the_checkpoint_logits(tmp_path, tiny_tokenizer, tied):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, tied)
    path = tmp_path / "model.gguf"
    export_gguf(ckpt, path, embedding_type="f16", output_type="f16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    checkpoint = load_quantized(ckpt).model
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a, b = model(ids).logits, checkpoint(ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # a permutation left out (or applied twice) would not survive transformers' reversal
    assert (a - b).abs().max() < 1e-3 * b.abs().max()


def test_quantized_tied_embedding_keeps_its_blocks(tmp_path, tiny_tokenizer):
    """A tied embedding planned in a ggml type is stored once as token_embd (llama.cpp reuses it as the head)."""
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, True, embedding="q6_K")
    path = tmp_path / "model.gguf"
    export_gguf(ckpt, path, progress=False)
    _, tensors = read_back(path)
    assert "output.weight" not in tensors
    qtype, W = tensors["token_embd.weight"]
    emb = load_quantized(ckpt, cache=False).model.get_submodule("model.embed_tokens")
    assert isinstance(emb, QuantizedEmbedding) and qtype == T.Q6_K
    assert np.array_equal(W, emb.dequantized_weight().numpy())
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        a, b = model(ids).logits, load_quantized(ckpt).model(ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_default_types_and_metadata(tmp_path, tiny_tokenizer):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, False)
    path = tmp_path / "model.gguf"
    result = export_gguf(ckpt, path, progress=False)
    reader, tensors = read_back(path)
    state = load_quantized(ckpt).model.state_dict()
    for gname, key in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        qtype, W = tensors[gname]
        assert qtype == T.Q8_0   # the default for the float embedding and head
        ref = state[key].numpy()
        # q8_0: one fp16 scale per 32 weights, codes in [-127, 127]: half a step from the weight, plus the
        # scale's fp16 rounding (2^-11 relative) times the largest code
        step = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        err = np.abs(W.reshape(-1, 32) - ref.reshape(-1, 32))
        assert np.all(err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-8) and err.max() > 0

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == LAYERS and field("llama.embedding_length") == HIDDEN
    assert field("llama.feed_forward_length") == FFN and field("llama.attention.head_count") == HEADS
    assert field("llama.attention.head_count_kv") == KV_HEADS
    assert field("llama.rope.dimension_count") == HIDDEN // HEADS
    assert field("llama.context_length") == 128 and field("llama.vocab_size") == len(tiny_tokenizer)
    assert abs(field("llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-10
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "default"
    vocab = tiny_tokenizer.get_vocab()
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field("tokenizer.ggml.eos_token_id") == vocab["<eos>"]
    # the most common matrix type names the file, as llama.cpp guesses it: q8_0 (the embedding, the head and
    # one linear) over q4_K (two linears)
    matrix_types = [t.tensor_type for t in reader.tensors if len(t.shape) == 2]
    assert matrix_types.count(T.Q8_0) == 3 and max(matrix_types.count(t) for t in set(matrix_types) - {T.Q8_0}) == 2
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    plan = json.loads(field("bitplan.plan"))
    assert plan["modules"] == formats
    assert field("bitplan.version")


def test_rotated_formats_are_refused(tmp_path, tiny_tokenizer):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, False, mix=["q4_0", "int4-g32", "higgs-p2-n64-g64"])
    out = tmp_path / "model.gguf"
    with pytest.raises(BitplanError, match=r"^9 module\(s\) are in rotated bitplan formats.*k_proj \(int4-g32\)"
                                           r".*v_proj \(higgs-p2-n64-g64\).*and 6 more.*--formats ggml"):
        export_gguf(ckpt, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".model.gguf.*"))


def test_unsupported_architecture_and_bad_types(tmp_path, tiny_tokenizer):
    folder, ckpt, _ = build(tmp_path, tiny_tokenizer, False, mix=["q8_0"])
    with pytest.raises(BitplanError, match="--embedding-type q4_K"):
        export_gguf(ckpt, tmp_path / "a.gguf", embedding_type="q4_K", progress=False)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                  "sliding_window": 16}))
    with pytest.raises(BitplanError, match="sliding window of 16 tokens"):
        export_gguf(ckpt, tmp_path / "a.gguf", progress=False)
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn",
                                                                                "rope_theta": 1e4, "factor": 2.0}}))
    with pytest.raises(BitplanError, match="'yarn' rope scaling"):
        export_gguf(ckpt, tmp_path / "a.gguf", progress=False)
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(BitplanError, match="supports LlamaForCausalLM.*GPTNeoXForCausalLM"):
        export_gguf(ckpt, tmp_path / "a.gguf", progress=False)
    with pytest.raises(BitplanError, match="not a bitplan checkpoint|config.json missing"):
        export_gguf(folder.parent / "nothing", tmp_path / "a.gguf", progress=False)


def test_a_killed_export_leaves_no_file(tmp_path, tiny_tokenizer, monkeypatch):
    folder, ckpt, _ = build(tmp_path, tiny_tokenizer, False, mix=["q8_0"])
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(ckpt, out, progress=False)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model.gguf"]
