"""A model folder's safetensors shards, read one tensor (or a few rows of one) at a time, and the model's identity
hash from them.

A folder holds `model.safetensors.index.json` (its `weight_map`: tensor name → shard file) or one
`model.safetensors`. Headers are read once; a tensor's bytes are then read straight into a tensor of its own
(a safetensors file stores each tensor as one little-endian row-major byte range). Plain reads, not a memory
map: pages of a mapped file count in the process's resident memory while they stay mapped, and a copied-out
tensor would then be held twice. Large tensors that need no whole-matrix work (hashing, converting to the
checkpoint's dtypes) are read in row blocks (`chunks`).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BitplanError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


CHUNK_BYTES = 1 << 26   # rows read at once by `Shards.chunks`: 64 MiB


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0      # where its bytes start in the file

    @property
    def row_bytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape[1:]:
            n *= d
        return n


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A safetensors file's tensors (name → TensorInfo) and its `__metadata__`, from the header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None) or {}
        return {k: TensorInfo(path, DTYPES[v["dtype"]], tuple(v["shape"]), 8 + size + v["data_offsets"][0])
                for k, v in header.items()}, meta
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BitplanError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


class Shards:
    """The tensors of a model folder's safetensors files, by name."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def open(cls, folder: str | Path) -> "Shards | None":
        """The folder's shards, or None when it holds no safetensors weights (a pytorch_model.bin, say)."""
        folder = Path(folder)
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise BitplanError(f"{index} is unreadable ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            return None
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            if not (folder / name).is_file():
                raise BitplanError(f"{folder} is incomplete: {name} (listed in {INDEX}) is missing")
            tensors.update(read_header(folder / name)[0])
        return cls(folder, tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        """One tensor, in its stored dtype, on the CPU."""
        info = self.tensors[key]
        return self.read(key, 0, info.shape[0] if info.shape else 1)

    def chunks(self, key: str, max_bytes: int | None = None):
        """The tensor `key` as blocks of whole rows (along its first dimension) of at most `max_bytes` each (at
        least one row); a 0- or 1-dimensional tensor in one piece."""
        info = self.tensors[key]
        if len(info.shape) < 2:
            yield self.get(key)
            return
        step = max(1, (max_bytes or CHUNK_BYTES) // max(info.row_bytes, 1))
        for start in range(0, info.shape[0], step):
            yield self.read(key, start, min(start + step, info.shape[0]))

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of tensor `key` (for a 0-dimensional tensor: 0, 1)."""
        info = self.tensors[key]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.dtype)
        size = out.numel() * out.element_size()
        try:
            with open(info.file, "rb") as f:
                f.seek(info.offset + start * info.row_bytes)
                got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) if size else 0
        except OSError as e:
            raise BitplanError(f"{info.file} is unreadable at {key} ({type(e).__name__}: {e})") from None
        if got != size:
            raise BitplanError(f"{info.file} is truncated: {key} ends past the end of the file; download or save "
                               "the model again")
        return out


def state_names(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter's and buffer's names, grouped under the first (a tied weight has several)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = first.setdefault(id(t), name)
        names.setdefault(key, []).append(name)
    return names


def missing_tensors(model: nn.Module, shards: Shards) -> list[str]:
    """The parameters of `model` (a skeleton of the shards' model) that no shard holds under any of their names,
    or holds with another shape."""
    names = state_names(model)
    return [name for name, p in model.named_parameters()
            if (key := shard_key(names, name, shards)) is None or shards.tensors[key].shape != tuple(p.shape)]


def shard_key(names: dict[str, list[str]], name: str, shards: Shards) -> str | None:
    """The name under which the shards hold tensor `name` (itself, or another name of the same tied tensor)."""
    return next((a for a in names.get(name, [name]) if a in shards), None)


def shards_sha256(model: nn.Module, shards: Shards, dtype: torch.dtype = torch.float32) -> str:
    """`bitplan.models.weights_sha256` of the model the shards load into with floating tensors in `dtype`, one
    tensor at a time: the same names and order (from `model`, a skeleton built from the config), shapes, and
    bytes after the same cast (bf16 or fp16 to float32 is exact). A buffer no shard holds (computed at
    construction, not saved) is taken from the skeleton."""
    h = hashlib.sha256()
    seen: set[int] = set()
    aliases = state_names(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "rotary" in name or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        key = shard_key(aliases, name, shards)
        if key is None and t.is_meta:
            raise BitplanError(f"{shards.folder}: no shard holds {name}")
        stored = shards.tensors[key].dtype if key is not None else t.dtype
        h.update(f"{name}|{tuple(t.shape)}|{dtype if stored.is_floating_point else stored}".encode())
        # row blocks in order: their bytes are the whole tensor's (row-major)
        for x in (shards.chunks(key) if key is not None else [t.detach()]):
            if x.is_floating_point():
                x = x.to(dtype)
            h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy())
            del x   # before the next block is read
    return h.hexdigest()
