"""`bitplan export compressed-tensors` on tiny random Llamas (and the default model, model tier): every scheme it
writes decodes through compressed-tensors' own decompression to bitplan's dequantized weight bit for bit,
transformers loads the folder with the checkpoint's logits, and what vLLM cannot run is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

from bitplan.apply import apply_formats, load_quantized
from bitplan.errors import BitplanError
from bitplan.export import export_compressed_tensors
from bitplan.formats import get_format
from bitplan.formats.runtimes import runtime_formats
from bitplan.loading import open_model
from bitplan.models import find_linears, load_model

from tests.conftest import WIKITEXT

# every scheme the exporter writes: vLLM's integer formats (sint 2..8, uint 4 and 8, groups of 32/64/128)
SCHEMES = [f.name for f in runtime_formats("vllm") if f.kind != "fp16"]
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gateup",
         "up_proj": "gateup", "down_proj": "down"}


def build(tmp_path, tokenizer, layers=2, tied=False, intermediate=256, bias=False):
    """A tiny Llama folder (hidden 128: every vLLM group size divides its widths; norms away from 1, so that
    their fp16 rounding shows) and the loaded model."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=128, tie_word_embeddings=tied, attention_bias=bias)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        model.lm_head.weight.mul_(20.0)   # peaked predictions, like a real LM
    folder = tmp_path / f"tiny-{layers}-{'tied' if tied else 'untied'}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder))


def by_group(lm, choose) -> dict[str, str]:
    """Formats for the block linears, one per fused group: `choose(block, group)` → format name."""
    return {info.name: choose(info.block, FUSED[info.kind]) for info in find_linears(lm.model)}


def read_export(out) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((out / "config.json").read_text())
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return config, tensors


def test_every_scheme_decodes_through_compressed_tensors_exactly(tmp_path, tiny_tokenizer):
    lm = build(tmp_path, tiny_tokenizer, layers=7)   # 7 blocks × 4 fused groups ≥ one group per scheme
    groups = [(b, g) for b in range(7) for g in ("qkv", "o", "gateup", "down")]
    assert len(groups) > len(SCHEMES)
    chosen = {group: SCHEMES[i] if i < len(SCHEMES) else "fp16" for i, group in enumerate(groups)}
    formats = by_group(lm, lambda b, g: chosen[(b, g)])
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(lm, formats, ckpt, rounding="rtn", progress=False)
    result = export_compressed_tensors(ckpt, out, max_shard_bytes=300_000, progress=False)
    assert len(result.shards) > 1 and (out / "model.safetensors.index.json").is_file()

    config, tensors = read_export(out)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["version"] == "0.20.1" and qc["quantization_status"] == "compressed"
    assert set(qc["config_groups"]) == set(SCHEMES)
    fp16 = [n for n, f in formats.items() if f == "fp16"]
    assert sorted(qc["ignore"]) == sorted(fp16 + ["lm_head"])
    loaded = load_quantized(ckpt, cache=False).model
    for scheme_name, group in qc["config_groups"].items():
        fmt = get_format(scheme_name)
        assert sorted(group["targets"]) == sorted(n for n, f in formats.items() if f == scheme_name)
        scheme = QuantizationScheme.model_validate(group)
        assert (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric) == \
            (fmt.code_bits, fmt.group_size, not fmt.has_zero)
        for name in group["targets"]:
            stored = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
            assert set(stored) == {"weight_packed", "weight_scale", "weight_shape"} | \
                ({"weight_zero_point"} if fmt.has_zero else set()), name
            expected = loaded.get_submodule(name).effective_weight()
            m, n = expected.shape
            assert stored["weight_packed"].dtype == torch.int32
            assert tuple(stored["weight_packed"].shape) == (m, -(-n * fmt.code_bits // 32))
            assert stored["weight_scale"].dtype == torch.float16 and stored["weight_shape"].tolist() == [m, n]
            # compressed-tensors' own decompression: in fp16 (as stored) the fp16 rounding of bitplan's weight,
            # with the scales widened to float32 bitplan's float32 weight itself
            W16 = PackedQuantizationCompressor.decompress(dict(stored), scheme)["weight"]
            assert W16.dtype == torch.float16 and torch.equal(W16, expected.half()), name
            wide = {**stored, "weight_scale": stored["weight_scale"].float()}
            W32 = PackedQuantizationCompressor.decompress(wide, scheme)["weight"]
            assert torch.equal(W32, expected), name
    # everything else as fp16, the checkpoint's values
    state = loaded.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight", f"{fp16[0]}.weight"):
        assert tensors[key].dtype == torch.float16 and torch.equal(tensors[key], state[key].half()), key


def reference_logits(ckpt, ids, round_vectors: bool) -> torch.Tensor:
    """bitplan's own checkpoint's logits; with `round_vectors`, its norm weights and biases (kept fp32 in the
    checkpoint) first rounded to fp16, as the export stores them."""
    model = open_model(ckpt).model
    if round_vectors:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1 and p.is_floating_point():
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_loads_it_with_the_checkpoints_logits(tmp_path, tiny_tokenizer, tied):
    lm = build(tmp_path, tiny_tokenizer, tied=tied, bias=True)
    mix = {(0, "qkv"): "sint4-g32", (1, "qkv"): "sint8-g128", (0, "o"): "sint3-g64", (1, "o"): "sint5-g128",
           (0, "gateup"): "sint2-g128", (1, "gateup"): "fp16", (0, "down"): "sint6-g32", (1, "down"): "sint7-g64"}
    formats = by_group(lm, lambda b, g: mix[(b, g)])
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(lm, formats, ckpt, rounding="rtn", progress=False)
    export_compressed_tensors(ckpt, out, progress=False)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 40), generator=torch.Generator().manual_seed(1))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = exported(ids).logits
    # the decompressed weights are bitplan's own, bit for bit
    loaded = load_quantized(ckpt, cache=False).model
    for name, fmt in formats.items():
        if fmt != "fp16":
            assert torch.equal(exported.get_submodule(name).weight, loaded.get_submodule(name).effective_weight())
    # the only difference is the fp16 rounding of norm weights and biases: with them rounded the logits agree to
    # float32 accumulation order, without to fp16 rounding
    torch.testing.assert_close(got, reference_logits(ckpt, ids, True), rtol=1e-5, atol=1e-4)
    plain = reference_logits(ckpt, ids, False)
    assert (got - plain).abs().max() <= 2**-10 * plain.abs().max()
    assert not torch.equal(got, plain)   # the rounding is there, so the comparison above is not vacuous
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_uint_layers_load_dequantized(tmp_path, tiny_tokenizer):
    """uint layers through transformers: its default path (weights decompressed on the first forward) gives the
    packed zero points of compressed-tensors 0.20.1's layout a parameter of the unpacked shape and refuses them, so
    this loads with `dequantize=True`, which decodes in the stored fp16 (and takes one scheme for all layers)."""
    lm = build(tmp_path, tiny_tokenizer)
    formats = by_group(lm, lambda b, g: "fp16" if (b, g) == (1, "gateup") else "uint4-g64")
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(lm, formats, ckpt, rounding="rtn", progress=False)
    export_compressed_tensors(ckpt, out, progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    loaded = load_quantized(ckpt, cache=False).model
    for name, fmt in formats.items():
        expected = loaded.get_submodule(name).effective_weight()
        if fmt != "fp16":
            assert torch.equal(exported.get_submodule(name).weight, expected.half().float()), name


@pytest.mark.parametrize("case", ["untied-qkv", "rotated", "embedding", "ggml", "partial-group"])
def test_refuses_what_vllm_cannot_run(tmp_path, tiny_tokenizer, case):
    lm = build(tmp_path, tiny_tokenizer, intermediate=320)   # down_proj: 320 inputs, no whole groups of 128
    formats = by_group(lm, lambda b, g: "sint4-g64")
    layer, words = {
        "untied-qkv": ("model.layers.1.self_attn.k_proj", ("sint8-g64", "fuses", "qkv_proj", "--runtime vllm")),
        "rotated": ("model.layers.0.self_attn.o_proj", ("int4-g64", "rotates")),
        "embedding": ("model.embed_tokens", ("sint8-g64", "token embedding")),
        "ggml": ("model.layers.0.mlp.gate_proj", ("q4_0", "ggml")),
        "partial-group": ("model.layers.1.mlp.down_proj", ("sint4-g128", "320 inputs")),
    }[case]
    formats[layer] = words[0]
    if case == "ggml":
        formats["model.layers.0.mlp.up_proj"] = "q4_0"   # tied to gate_proj: the format is the reason
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(lm, formats, ckpt, rounding="rtn", progress=False)
    with pytest.raises(BitplanError) as e:
        export_compressed_tensors(ckpt, out, progress=False)
    message = str(e.value)
    assert "\n" not in message and layer in message, message
    for word in words:
        assert word in message, message
    assert not out.exists() and not list(tmp_path.glob(".ct.*"))




def test_cli_prints_groups_and_the_serve_line(tmp_path, tiny_tokenizer, monkeypatch, capsys, cli):
    lm = build(tmp_path, tiny_tokenizer)
    formats = by_group(lm, lambda b, g: {"qkv": "sint4-g128", "down": "uint8-g64"}.get(g, "sint8-g32"))
    formats["model.layers.1.self_attn.o_proj"] = "fp16"
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(lm, formats, ckpt, rounding="rtn", progress=False)
    (ckpt / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": 1}\n')
    code, stdout, err = cli("export", "compressed-tensors", str(ckpt), "-o", str(out))
    assert code == 0, err
    assert (out / "generation_config.json").read_text() == (ckpt / "generation_config.json").read_text()
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]
    assert ["sint4-g128", "4", "128", "no", "6"] in rows, stdout
    assert ["uint8-g64", "8", "64", "integer", "2"] in rows, stdout
    assert ["sint8-g32", "8", "32", "no", "5"] in rows, stdout
    assert ["fp16 (ignore)", "16", "", "", "2"] in rows, stdout   # o_proj of block 1 and the head
    assert f"vllm serve {out} --dtype float16" in " ".join(stdout.split())
    code, stdout, err = cli("export", "compressed-tensors", str(ckpt), "-o", str(out))
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.model
def test_default_model_exports_with_the_checkpoints_logits(smollm2, tmp_path):
    """The default model with 4- and 8-bit symmetric layers (groups of 64 on its 576-wide inputs, 128 on
    down_proj's 1536), rounded to nearest: transformers' logits of the export equal the checkpoint's to fp16
    rounding on real text."""
    def fmt(info):
        bits = 4 if info.block % 2 == 0 else 8
        return f"sint{bits}-g{128 if info.kind == 'down_proj' else 64}"

    formats = {info.name: fmt(info) for info in find_linears(smollm2.model)}
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    apply_formats(smollm2, formats, ckpt, rounding="rtn", progress=False)
    export_compressed_tensors(ckpt, out, progress=False)
    from bitplan.data import token_windows

    ids = token_windows(smollm2.tokenizer, WIKITEXT, n_windows=2, seqlen=128)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = exported(ids).logits
    torch.testing.assert_close(got, reference_logits(ckpt, ids, True), rtol=1e-4, atol=1e-3)
    plain = reference_logits(ckpt, ids, False)
    assert (got - plain).abs().max() <= 2**-8 * plain.abs().max()
