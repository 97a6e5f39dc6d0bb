"""Where apply reads a model's weights from: a model loaded whole, or its safetensors shards one tensor at a time.

Read lazily, the model's structure (module names, shapes, which weights are tied) comes from a skeleton built
from its config with empty weights (accelerate's `init_empty_weights`: parameters on the meta device, buffers
computed as at load), and each tensor from the shards when it is needed. A model saved otherwise (a
pytorch_model.bin, or parameters under names the shards do not hold) is loaded whole, with a note. A .gguf file
or a built-in model is a safetensors folder once converted (`bitplan.models.resolve_model_path`; the
conversion, once per file, loads it whole).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..errors import BitplanError
from ..models import LoadedModel, load_model, load_tokenizer, model_id, resolve_model_path, weights_sha256
from ..shards import Shards, missing_tensors, shard_key, shards_sha256, state_names


@dataclass
class WeightSource:
    model: nn.Module                    # the loaded model, or (lazy) its skeleton with meta-device parameters
    tokenizer: object
    spec: str
    model_id: str
    path: Path
    shards: Shards | None = None        # None: the weights are the loaded model's
    names: dict[str, list[str]] = field(default_factory=dict)   # a tensor's names (tied weights have several)

    @property
    def lazy(self) -> bool:
        return self.shards is not None

    @classmethod
    def loaded(cls, lm: LoadedModel) -> "WeightSource":
        return cls(lm.model, lm.tokenizer, lm.spec, lm.model_id, lm.path)

    def tensor(self, name: str) -> torch.Tensor:
        """The state-dict tensor `name` (read lazily: a floating one in float32, as the model loaded in float32
        holds it)."""
        if not self.lazy:
            try:
                return self.model.get_parameter(name).detach()
            except AttributeError:
                return self.model.get_buffer(name)
        key = shard_key(self.names, name, self.shards)
        t = self.shards.get(key) if key is not None else self.model.get_buffer(name)
        return t.to(torch.float32) if t.is_floating_point() else t

    def chunks(self, name: str, rows: int | None = None):
        """`tensor(name)` in blocks of rows: of `rows` rows each, or (None) as bitplan.shards.Shards.chunks sizes
        them, the whole tensor when it is not read lazily (lazy: read a block at a time)."""
        key = shard_key(self.names, name, self.shards) if self.lazy else None
        if key is None:
            t = self.tensor(name)
            yield from ([t] if rows is None else (t[start:start + rows] for start in range(0, t.shape[0], rows)))
            return
        for t in self.shards.chunks(key, rows * self.shards.tensors[key].row_bytes if rows else None):
            yield t.to(torch.float32) if t.is_floating_point() else t

    def tensor_info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of `tensor(name)` without reading it."""
        if not self.lazy:
            t = self.tensor(name)
            return t.dtype, tuple(t.shape)
        key = shard_key(self.names, name, self.shards)
        if key is None:
            t = self.model.get_buffer(name)
            return t.dtype, tuple(t.shape)
        info = self.shards.tensors[key]
        return (torch.float32 if info.dtype.is_floating_point else info.dtype), info.shape

    def weight(self, module: str) -> torch.Tensor:
        """The weight of module `module`, on the CPU."""
        if not self.lazy:
            return self.model.get_submodule(module).weight.detach()
        return self.tensor(f"{module}.weight")

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The model's identity (`bitplan.models.weights_sha256`, whatever dtype the model is held in)."""
        return shards_sha256(self.model, self.shards) if self.lazy else weights_sha256(self.model)


def skeleton(path: Path, spec: str) -> nn.Module:
    """The model of the folder `path` with empty weights: its structure, with no memory for its parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..models import _quiet_transformers, read_causal_config

    config = read_causal_config(path, spec, "not a model to quantize; pass the original model")
    with _quiet_transformers():
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # init_empty_weights gives every registered parameter a meta copy, which unties a tied head: tie again
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def renamed(shards: Shards, model: nn.Module) -> tuple[Shards | None, str]:
    """The shards under the names `model` has: transformers renames some checkpoints' keys as it loads them
    (GPT-NeoX's `embed_out` is `lm_head`, old LayerNorm `gamma`/`beta`, ...). A key that transformers would
    convert otherwise than by a rename (experts fused, say) cannot be read tensor by tensor: None and why."""
    import re

    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    try:
        transforms = get_model_conversion_mapping(model) or []
    except Exception:   # a model transformers keeps no mapping for
        transforms = []
    tensors = {}
    for key, info in shards.tensors.items():
        name = key
        for t in transforms:
            sources, targets = list(t.source_patterns), list(t.target_patterns)
            hit = next((i for i, src in enumerate(sources) if re.search(src, name)), None)
            if hit is None:
                continue
            if not isinstance(t, WeightRenaming):
                return None, f"transformers converts its tensor {key} as it loads it ({type(t).__name__})"
            name = re.sub(sources[hit], targets[hit if len(targets) > 1 else 0], name)
        tensors[name] = info
    return Shards(shards.folder, tensors), ""


def open_lazy(spec: str) -> tuple[WeightSource | None, str]:
    """The model `spec` read from its shards, or None and why it cannot be."""
    path = resolve_model_path(spec)
    shards = Shards.open(path)
    if shards is None:
        return None, f"{spec} has no safetensors weights"
    model = skeleton(path, spec)
    shards, why = renamed(shards, model)
    if shards is None:
        return None, why
    missing = missing_tensors(model, shards)
    if missing:
        return None, f"its safetensors files hold no tensor named {missing[0]} (nor {len(missing) - 1} more)"
    return WeightSource(model, load_tokenizer(path, spec), spec, model_id(spec, path), path, shards,
                        state_names(model)), ""


def open_source(model: "str | LoadedModel | WeightSource", lazy: bool | None = None, note=None,
                device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto") -> WeightSource:
    """`model` as apply reads it. `lazy` None: from the shards where the model is saved as safetensors, else
    loaded whole (`note` is called with why); True: from the shards or a BitplanError; False: loaded whole, on
    the CPU in the dtype that `dtype` means on `device` (bitplan.devices.resolve_dtype). A LoadedModel is used
    as it is."""
    if isinstance(model, WeightSource):
        return model
    if isinstance(model, LoadedModel):
        return WeightSource.loaded(model)
    spec = str(model)
    if lazy is not False:
        source, why = open_lazy(spec)
        if source is not None:
            return source
        if lazy:
            raise BitplanError(f"cannot read {spec} one layer at a time: {why}; apply it loaded whole (lazy=None)")
        if note is not None:
            note(f"{why}: loading the whole model (apply reads layers one at a time from safetensors files only)")
    path = resolve_model_path(spec)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = None   # load_model says what is wrong with it
    return WeightSource.loaded(load_model(spec, dtype=resolve_dtype(dtype, resolve_device(device), config)))
