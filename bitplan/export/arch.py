"""Which transformers architectures export to GGUF, and how: the GGUF architecture, tensor names from the gguf
package's name map, llama.cpp's row order of the rotary projections, and the hyperparameter keys."""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import BitplanError


@dataclass(frozen=True)
class GgufArch:
    arch: gguf.MODEL_ARCH
    permute_qk: bool   # llama.cpp's llama graph expects q/k rows reordered per head (interleaved rotary pairs)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Mistral converts to llama.cpp's llama architecture (as llama.cpp's own converter does); Qwen 2 and 3 use the
# neox rotary layout and keep the rows as they are.
ARCHITECTURES = {
    "LlamaForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN3, False),
}


def gguf_arch(config) -> GgufArch:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    by_type = {a.removesuffix("ForCausalLM").lower(): v for a, v in ARCHITECTURES.items()}
    if not archs and getattr(config, "model_type", None) in by_type:
        return by_type[config.model_type]
    raise BitplanError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is "
                       f"{', '.join(archs) or getattr(config, 'model_type', 'of an unknown architecture')}")


class TensorNames:
    """Hugging Face tensor names → GGUF names (`blk.N.attn_q.weight`), by the gguf package's map."""

    def __init__(self, arch: GgufArch, n_blocks: int):
        self.map = gguf.get_tensor_name_map(arch.arch, n_blocks)

    def __call__(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BitplanError(f"no GGUF name for the tensor {hf_name}; this exporter does not know where it goes")
        return name


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's order of a q/k projection's rows: within each head, the first and second halves of the rotary
    dimensions interleaved. Whole rows move, so packed block rows permute like float rows."""
    shape = rows.shape
    if shape[0] % (2 * n_head):
        raise BitplanError(f"a q/k projection of {shape[0]} rows does not split into {n_head} heads of rotary pairs")
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def qk_heads(hf_name: str, config) -> int | None:
    """The head count by which llama.cpp reorders this tensor's rows, or None for a tensor it leaves alone."""
    base = hf_name.rsplit(".", 1)[0]
    if base.endswith("q_proj"):
        return config.num_attention_heads
    if base.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in
                             (None, "default")):
        raise BitplanError(f"GGUF export writes plain rotary embeddings; this model uses {kind!r} rope scaling")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_config(config) -> None:
    """Refuse, before any work, what the GGUF written here cannot express."""
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and \
            window < config.max_position_embeddings:
        raise BitplanError(f"this model attends through a sliding window of {window} tokens, which GGUF's llama "
                           "architecture does not express; exporting it would change its outputs")
    rope_theta(config)


def write_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
