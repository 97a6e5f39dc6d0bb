"""The quantized checkpoint: writing it atomically, and loading it back into a transformers model.

Layout of a checkpoint folder:
    config.json          the model's config with `quantization_config` = {quant_method: "bitplan", version,
                         modules: {name: format}, files: {name: sha256}, plan, calibration, rounding, ...}
    model.safetensors    per quantized module `<name>.codes` (int32 packed), `<name>.scale` / `.zero` (fp16; the
                         integer zero point of a uint format uint8), `<name>.rotation_seeds` (2 × uint64 stored
                         as int64); fp16 modules `<name>.weight`;
                         each grid's codebook once as `bitplan.codebook.grid-p{p}-n{n}`; every other tensor fp16
                         (norm weights fp32: they are tiny and sensitive). A quantized token embedding is stored
                         like a linear's weight [vocab, hidden] under its module name, once: a head tied to it
                         has no tensor of its own (`quantization_config.tied_head`), and no fp16 copy is kept
    tokenizer files
`write_checkpoint` writes a model held in memory; `write_checkpoint_parts` the same bytes from a model read one
tensor at a time (bitplan.apply.source) and the job's part files, streamed (bitplan.apply.stream).
The whole folder is written under a temporary name and renamed into place, so a reader never sees half of one;
the sha256 of model.safetensors in config.json catches truncation and corruption on load. config.json lists the
files bitplan wrote (`written_files`): replacing a checkpoint (`overwrite`) replaces those and keeps any other
file a user put in the folder (an eval.json, a results/ folder). Folders bitplan makes beside a checkpoint
(`.NAME.job`, `.NAME.old`) carry a marker file, and bitplan never deletes such a folder without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import BitplanError
from ..formats import get_format
from ..io import atomic_folder, check_writable
from ..solve.accounting import codebook_key
from .embedding import QuantizedEmbedding, TiedQuantizedHead, is_tied, module_name
from .module import QuantizedLinear

QUANT_METHOD = "bitplan"
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"
CODEBOOK_PREFIX = "bitplan.codebook."
OWNED_MARKER = ".bitplan-owned"
# What bitplan writes into a checkpoint folder; checkpoints written before `written_files` was recorded are read
# as having written these (the tokenizer files transformers saves)
_KNOWN_FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                "chat_template.json", "generation_config.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def sibling(out_dir: str | Path, suffix: str) -> Path:
    """`.NAME.suffix` beside `out_dir`: where apply keeps its part files (job) or moves a replaced checkpoint's
    files (old)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.{suffix}")


def mark_owned(folder: Path) -> None:
    """Create `folder` (if needed) as one of bitplan's: only a marked folder is ever deleted by bitplan."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OWNED_MARKER
    if not marker.is_file():
        marker.write_text("made by bitplan beside a checkpoint folder; removed when the run that made it ends\n")


def _owned(folder: Path) -> bool:
    """A folder bitplan may use and delete: one it marked, or an empty one."""
    return folder.is_dir() and ((folder / OWNED_MARKER).is_file() or not any(folder.iterdir()))


def remove_owned(folder: Path, names) -> None:
    """Delete from a marked folder the files bitplan put there (`names`, leftover temporary files, the marker),
    then the folder itself if nothing else is left in it."""
    if not folder.is_dir() or not (folder / OWNED_MARKER).is_file():
        return
    for name in {*names, OWNED_MARKER}:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for tmp in folder.glob(".*.tmp"):   # atomic writes cut short
        tmp.unlink()
    try:
        folder.rmdir()
    except OSError:   # something else is in it: not ours to delete
        pass


def written_files(folder: str | Path) -> set[str]:
    """The names of the files bitplan wrote in the checkpoint `folder` (listed in its config.json)."""
    folder = Path(folder)
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        qc = {}
    listed = qc.get("written_files") if isinstance(qc, dict) else None
    if not isinstance(listed, list):
        return set(_KNOWN_FILES)
    return {n for n in listed if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n
            and os.sep not in n} | {"config.json"}


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, a checkpoint folder that apply may not write: a path that cannot be written, a
    folder holding anything but a bitplan checkpoint, a checkpoint unless `overwrite`, or a `.NAME.job` /
    `.NAME.old` beside it that bitplan did not make."""
    out_dir = Path(out_dir)
    check_writable(out_dir, "folder", "checkpoint folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not is_checkpoint(out_dir):
            raise BitplanError(f"{out_dir} exists and is not a bitplan checkpoint; refusing to overwrite it")
        if not overwrite:
            raise BitplanError(f"{out_dir} already holds a bitplan checkpoint; pass --overwrite to replace it "
                               "(only the files bitplan wrote there are replaced, any other file is kept)")
    for suffix in ("job", "old"):
        near = sibling(out_dir, suffix)
        if (near.exists() or near.is_symlink()) and not _owned(near):
            raise BitplanError(f"{near} exists and was not made by this bitplan; bitplan keeps its own work there "
                               f"while writing {out_dir.name}: move it away (or delete it if it is left from an "
                               "earlier bitplan run)")
    return out_dir


def _keep_precision(name: str, t: torch.Tensor) -> torch.Tensor:
    """Non-quantized tensors are stored fp16 (what plans account for); 1-D norm weights and biases stay fp32."""
    if not t.is_floating_point():
        return t
    return t.to(torch.float32) if t.dim() == 1 else t.to(torch.float16)


def write_checkpoint(out_dir: str | Path, model: nn.Module, tokenizer, layers: dict[str, dict[str, torch.Tensor]],
                     formats: dict[str, str], metadata: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a checkpoint of `model` whose modules in `layers` (name → packed tensors) are replaced.
    An existing checkpoint in `out_dir` is refused unless `overwrite`; then only the files bitplan wrote there
    are replaced."""
    check_out_dir(out_dir, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    quantized_weights = {f"{name}.weight" for name in layers}
    # a quantized embedding's packed tensors replace its fp16 matrix under every name it has (a tied head's too)
    quantized_ptrs = {model.get_submodule(name).weight.data_ptr() for name in layers}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in quantized_weights or t.data_ptr() in quantized_ptrs or "rotary" in key or key.endswith("inv_freq"):
            continue
        if t.data_ptr() in seen:  # a tied weight (the head sharing the embedding) is stored once
            continue
        seen.add(t.data_ptr())
        tensors[key] = _keep_precision(key, t.detach()).contiguous()
    for name, packed in layers.items():
        for key, t in packed.items():
            tensors[f"{name}.{key}"] = t.contiguous()
    tensors.update(_codebooks(formats))

    def weights(path: Path) -> str:
        save_file(tensors, str(path), metadata={"format": "pt"})
        return file_sha256(path)

    return _write_folder(out_dir, weights, model.config, tokenizer, formats, metadata)


def _codebooks(formats: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for fmt_name in sorted(set(formats.values())):  # one table per grid, shared by its group sizes
        fmt = get_format(fmt_name)
        table = fmt.codebook()
        if table is not None:
            out[CODEBOOK_PREFIX + codebook_key(fmt)] = table.to(torch.float32).contiguous()
    return out


def _stored_dtype(dtype: torch.dtype, ndim: int) -> torch.dtype:
    """The dtype `_keep_precision` gives a tensor of `dtype` and `ndim` dimensions."""
    if not dtype.is_floating_point:
        return dtype
    return torch.float32 if ndim == 1 else torch.float16


def write_checkpoint_parts(out_dir: str | Path, source, parts: dict[str, Path], formats: dict[str, str],
                           metadata: dict[str, Any], overwrite: bool = False) -> Path:
    """`write_checkpoint` with the model read one tensor at a time from `source` (a lazy
    `bitplan.apply.source.WeightSource`) and each quantized module's packed tensors from its part file
    (`parts`: module name → safetensors file): the same bytes, with one tensor in memory at a time."""
    from ..shards import read_header
    from .stream import Entry, save_streamed

    check_out_dir(out_dir, overwrite)
    model = source.model
    entries: list[Entry] = []
    seen: set[int] = set()
    quantized_weights = {f"{name}.weight" for name in parts}
    quantized_ids = {id(model.get_submodule(name).weight) for name in parts}
    for key, t in model.state_dict(keep_vars=True).items():   # keep_vars: a tied weight is one object
        if key in quantized_weights or id(t) in quantized_ids or "rotary" in key or key.endswith("inv_freq"):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        dtype, shape = source.tensor_info(key)
        entries.append(Entry(key, _stored_dtype(dtype, len(shape)), shape,   # a block's dims are the tensor's
                             lambda key=key: (_keep_precision(key, t) for t in source.chunks(key))))
    for name, part in parts.items():
        for key, info in read_header(part)[0].items():
            entries.append(Entry(f"{name}.{key}", info.dtype, info.shape,
                                 lambda part=part, key=key: _part_tensor(part, key)))
    entries += [Entry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in _codebooks(formats).items()]
    return _write_folder(out_dir, lambda path: save_streamed(entries, path, {"format": "pt"}), model.config,
                         source.tokenizer, formats, metadata)


def _part_tensor(part: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(part), framework="pt") as f:
        return f.get_tensor(key)


def _write_folder(out_dir: str | Path, weights, config, tokenizer, formats: dict[str, str],
                  metadata: dict[str, Any]) -> Path:
    """The checkpoint folder around its weights file, written under a temporary name and moved into place;
    `weights(path)` writes model.safetensors at `path` and returns its sha256."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, merge=_replace_files) as tmp:
        digest = weights(tmp / WEIGHTS)
        tokenizer.save_pretrained(tmp)
        qc = {"quant_method": QUANT_METHOD, "version": CHECKPOINT_VERSION, "modules": dict(formats),
              "files": {WEIGHTS: digest},
              "written_files": sorted({p.name for p in tmp.iterdir()} | {"config.json"}), **metadata}
        config = config.to_dict()
        config["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out_dir


def _replace_files(new: Path, out_dir: Path) -> None:
    """Replace the checkpoint in `out_dir` by the one in `new`: the files the old one wrote go to `.NAME.old`
    (deleted after), the new files move in; every other file in `out_dir` stays. config.json leaves first and
    comes back last, so the folder is never a checkpoint whose config describes the other's weights."""
    ours = written_files(out_dir)
    present = {p.name for p in out_dir.iterdir()}
    incoming = {p.name for p in new.iterdir()}
    clash = sorted(incoming & (present - ours))
    if clash:
        raise BitplanError(f"{out_dir / clash[0]} was not written by bitplan, and the new checkpoint has a file of "
                           "that name; move it away and run the same command again")
    old = sibling(out_dir, "old")
    if old.exists() or old.is_symlink():
        if not _owned(old):
            raise BitplanError(f"{old} exists and was not made by this bitplan; move it away")
        shutil.rmtree(old)
    mark_owned(old)
    leaving = sorted(ours & present, key=lambda n: (n != "config.json", n))
    for name in leaving:
        os.replace(out_dir / name, old / name)
    for name in sorted(incoming, key=lambda n: (n == "config.json", n)):
        os.replace(new / name, out_dir / name)
    remove_owned(old, leaving)


def read_quantization_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"{folder}/config.json is unreadable ({type(e).__name__}: {e})") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise BitplanError(f"{folder} is not a bitplan checkpoint (no quantization_config with quant_method \"bitplan\")")
    if qc.get("version") != CHECKPOINT_VERSION:
        raise BitplanError(f"{folder} is a bitplan checkpoint of version {qc.get('version')}; "
                           f"this bitplan reads version {CHECKPOINT_VERSION}")
    if not isinstance(qc.get("modules"), dict) or not qc["modules"]:
        raise BitplanError(f"{folder}/config.json lists no quantized modules")
    return qc


def load_tensors(folder: Path, qc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking the file is complete and unchanged."""
    path = folder / WEIGHTS
    if not path.is_file():
        raise BitplanError(f"{folder} is incomplete: {WEIGHTS} is missing")
    expected = (qc.get("files") or {}).get(WEIGHTS)
    if not expected:  # bitplan always records it: without it a damaged file would load silently
        raise BitplanError(f"{folder}/config.json records no sha256 for {WEIGHTS} (quantization_config.files), so "
                           "the weights cannot be checked; re-make the checkpoint with `bitplan apply`")
    if file_sha256(path) != expected:
        raise BitplanError(f"{path} is truncated or corrupted (its sha256 differs from the one in config.json)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise BitplanError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def build_model(folder: Path, qc: dict[str, Any], tensors: dict[str, torch.Tensor], cache: bool = True) -> nn.Module:
    """A transformers model whose quantized modules are QuantizedLinear (a quantized token embedding a
    QuantizedEmbedding, and the head tied to it a TiedQuantizedHead), every other weight from the file. The
    model is built with empty weights (a float32 model of Llama-3.2-1B's shape initialized at random took more
    memory than its checkpoint), and `tensors` is consumed: each plain weight leaves it as the model takes it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import _quiet_transformers

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()   # init_empty_weights gives a tied head a meta copy of its own: tie it again
    model.eval()
    for fmt_name in set(qc["modules"].values()):
        fmt = get_format(fmt_name)
        table = fmt.codebook()
        stored = tensors.get(CODEBOOK_PREFIX + codebook_key(fmt)) if table is not None else None
        if table is not None and (stored is None or not torch.equal(stored, table.to(torch.float32))):
            raise BitplanError(f"the checkpoint's {fmt_name} codebook differs from this bitplan's grid table; "
                               "it was made with other grids")
    used: set[str] = {k for k in tensors if k.startswith(CODEBOOK_PREFIX)}
    tied = is_tied(model)
    head_name = module_name(model, model.get_output_embeddings())
    embedding: QuantizedEmbedding | None = None
    for name, fmt_name in qc["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BitplanError(f"checkpoint module {name} does not exist in the {config.model_type} model") from None
        if not isinstance(old, (nn.Linear, nn.Embedding)):
            raise BitplanError(f"checkpoint module {name} is a {type(old).__name__}, not a linear layer")
        prefix = f"{name}."
        packed = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] != "bias"}
        bias = tensors.get(prefix + "bias")
        if not packed:
            raise BitplanError(f"the checkpoint has no tensors for module {name}")
        used.update(prefix + k for k in packed)
        if bias is not None:
            used.add(prefix + "bias")
        if isinstance(old, nn.Embedding):
            scale = getattr(old, "embed_scale", None)
            module = embedding = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, fmt_name, packed,
                                                    cache=cache, padding_idx=old.padding_idx,
                                                    embed_scale=scale if isinstance(scale, torch.Tensor) else None)
        else:
            module = QuantizedLinear(old.in_features, old.out_features, fmt_name, packed,
                                     bias.float() if bias is not None else None, cache=cache)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    if embedding is not None and tied and head_name is not None:
        bias = tensors.get(f"{head_name}.bias")
        if bias is not None:
            used.add(f"{head_name}.bias")
        parent, _, child = head_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                TiedQuantizedHead(embedding, bias.float() if bias is not None else None))
    rest = {}
    for k in [k for k in tensors if k not in used]:
        v = tensors.pop(k)   # an fp16 original is freed as its float32 copy is made
        # copies of their own: a tensor of the memory-mapped file would keep the whole file mapped and resident
        rest[k] = v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    del rest
    quantized_prefixes = tuple(f"{n}." for n in qc["modules"])
    missing = [k for k in missing if not k.startswith(quantized_prefixes) and "rotary" not in k and not k.endswith("inv_freq")]
    if getattr(config, "tie_word_embeddings", False) and embedding is None:
        model.tie_weights()
        head = model.get_output_embeddings()
        missing = [k for k in missing if head is None or not k.startswith(next(n for n, m in model.named_modules() if m is head))]
    if missing or unexpected:
        raise BitplanError(f"checkpoint tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:   # a weight neither quantized nor stored: it would have run with random values before
        raise BitplanError(f"the checkpoint holds no value for {', '.join(empty[:3])}" +
                           (f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""))
    model.requires_grad_(False)
    return model


def load_quantized(folder: str | Path, cache: bool = True):
    """Load a bitplan checkpoint as a LoadedModel (see bitplan.models) that runs on the CPU or any device."""
    from ..models import LoadedModel, load_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise BitplanError(f"no checkpoint at {folder} (config.json missing)")
    qc = read_quantization_config(folder)
    model = build_model(folder, qc, load_tensors(folder, qc), cache=cache)
    tokenizer = load_tokenizer(folder, str(folder))
    model.config.quantization_config = qc
    return LoadedModel(model=model, tokenizer=tokenizer, spec=str(folder), model_id=folder.name, path=folder)
