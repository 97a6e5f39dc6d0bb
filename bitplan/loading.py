"""Opening "a model" as eval and the CLI mean it: a bitplan checkpoint or a plain model.

bitplan.models loads plain causal LMs (built-in names, folders, .gguf files, cached hub ids) and knows nothing of
checkpoints; bitplan.apply.checkpoint loads checkpoints and builds on bitplan.models. This module stands above both
and picks between them, so neither has to import the other's side.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .apply.checkpoint import is_checkpoint, load_quantized
from .devices import fmt_bytes, resolve_device, resolve_dtype
from .io import read_json
from .offload import device_budget
from .models import (LoadedModel, MemoryLimit, load_model, load_tokenizer, model_id, read_causal_config,
                     resolve_model_path)


@dataclass
class ModelHeader:
    """What a model is without its weights: enough to choose evaluation windows before loading either model."""
    spec: str
    model_id: str
    config: dict               # its config.json (a checkpoint's holds its quantization_config)
    tokenizer: object
    checkpoint: bool


def open_header(spec: str | os.PathLike | LoadedModel) -> ModelHeader:
    """`spec`'s config and tokenizer, no weights read (a LoadedModel's own)."""
    if isinstance(spec, LoadedModel):
        config = spec.model.config.to_dict()
        quant = getattr(spec.model.config, "quantization_config", None)
        if isinstance(quant, dict):
            config["quantization_config"] = quant
        return ModelHeader(spec.spec, spec.model_id, config, spec.tokenizer, isinstance(quant, dict))
    path = resolve_model_path(str(spec))
    checkpoint = is_checkpoint(path)
    if not checkpoint:
        read_causal_config(path, str(spec))   # not a causal LM: said now, not once its weights are loaded
    config = read_json(path / "config.json", "model config")
    return ModelHeader(str(spec), model_id(str(spec), path), config, load_tokenizer(path, str(spec)),
                       checkpoint)


def open_model(spec: str | os.PathLike | LoadedModel, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", memory: MemoryLimit | None = None) -> LoadedModel:
    """A bitplan checkpoint folder (its quantized modules as QuantizedLinear), or a plain model loaded by
    `bitplan.models.load_model` in `dtype` on `device`, offloading what does not fit `memory` when given (a
    checkpoint is loaded whole: it is the compressed model). A LoadedModel is returned as it is.

    A checkpoint's packed codes, scales and codebooks keep their stored dtypes (QuantizedLinear computes in its
    input's dtype); its other weights (norms, an fp16 head or embedding) are cast to `dtype`."""
    if isinstance(spec, LoadedModel):
        return spec
    device = resolve_device(device)
    path = resolve_model_path(str(spec))
    if not is_checkpoint(path):
        return load_model(spec, dtype, device, memory)
    lm = load_quantized(path)
    dtype = resolve_dtype(dtype, device, read_json(path / "config.json", "checkpoint config"))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        if dtype != torch.float32:
            # A quantized embedding dequantizes to float32 rows; the blocks after it take `dtype`.
            lm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.to(dtype))
    lm.model.to(device)
    if memory is not None:
        lm.memory_note = _dequantize_per_call_if_short(lm, device, memory)
    return lm


def _dequantize_per_call_if_short(lm: LoadedModel, device: torch.device, memory: MemoryLimit) -> str:
    """A checkpoint's layers keep their dequantized float32 weights after the first call (fast on a CPU; their
    rotations cost more than the matmul) when those fit the memory beside the model; else every layer dequantizes
    at each call again. Returns the line saying so ("" when they fit). Layers the Triton kernels run keep no
    dequantized weight, so on CUDA only the others count."""
    from .apply.embedding import QuantizedEmbedding
    from .apply.module import QuantizedLinear

    kernels = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    cached = [m for m in lm.model.modules()
              if (isinstance(m, QuantizedLinear) and not (kernels and m.format.kind in ("int", "grid")))
              or (isinstance(m, QuantizedEmbedding) and not m.format.rotated)]
    if not any(m.cache for m in cached):
        return ""
    extra = sum(4 * (m.out_features * m.in_features if isinstance(m, QuantizedLinear)
                     else m.num_embeddings * m.embedding_dim) for m in cached)
    held = sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])
    budget = device_budget(device, memory.working_bytes, memory.max_memory_gb)
    if held + extra <= budget:
        return ""
    for m in cached:
        m.cache = False
    where = "memory" if device.type == "cpu" else str(device)
    return (f"{lm.spec}: its layers dequantized would take {fmt_bytes(extra)} beside its {fmt_bytes(held)}, and "
            f"{fmt_bytes(budget)} of {where} is its: each layer is dequantized again at every call, so this "
            "evaluation runs slower")
