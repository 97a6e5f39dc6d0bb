"""GGUF export of the other supported families (tiny random models): Qwen2 (q/k/v biases, rows kept in order),
Qwen3 (q/k norms) and Mistral (written as llama.cpp's llama architecture): transformers runs each file with the
checkpoint's logits."""
from __future__ import annotations

import gguf
import pytest
import torch
from transformers import (AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from bitplan.apply import apply_formats, load_quantized
from bitplan.export import export_gguf
from bitplan.models import find_linears, load_model

FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}, "qwen2"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}, "qwen3"),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}, "llama"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_with_the_checkpoint_logits(tmp_path, tiny_tokenizer, family):
    Config, Model, extra, arch = FAMILIES[family]
    torch.manual_seed(0)
    # 4 ids beyond the tokenizer's: Qwen2's tokenizer class adds one of its own, the rest are unused slots
    config = Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tiny_tokenizer) + 4, max_position_embeddings=128,
                    tie_word_embeddings=False, **extra)
    model = Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:   # away from 0 and 1, so that a misplaced one shows
                p.uniform_(0.5, 1.5)
    folder = tmp_path / family
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    formats = {info.name: ["q4_0", "q8_0", "q5_1"][i % 3] for i, info in enumerate(find_linears(lm.model))}
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    path = tmp_path / "model.gguf"
    export_gguf(tmp_path / "q", path, embedding_type="f16", output_type="f16", progress=False)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = loaded(ids).logits, load_quantized(tmp_path / "q").model(ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
