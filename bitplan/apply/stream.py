"""A safetensors file written one tensor at a time: the same bytes as `safetensors.torch.save_file`, without
holding every tensor at once.

safetensors lays a file out as an 8-byte little-endian header length, the header (compact JSON: `__metadata__`
first, then each tensor's dtype, shape and byte range, in data order; padded with spaces to a multiple of 8),
then the tensors' bytes back to back, ordered by dtype (widest first, in the order below) and then by name.
Each tensor's dtype and shape are known before it is read, so the header is written first and each tensor is
loaded, written and dropped in turn; a large one may come as blocks of rows, written as they come.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

# safetensors' Dtype enum in declaration order; data is sorted by it, descending
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
          "I64", "U64")
_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
          torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
          torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    # called once, when the tensor's bytes are written: the tensor, or its blocks of rows (along dim 0) in order
    load: Callable[[], torch.Tensor | Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def save_streamed(entries: list[Entry], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write `entries` as a safetensors file at `path`; returns the file's sha256. A loaded tensor whose dtype or
    shape differs from its entry's is an error (the header is already written)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two tensors of the same name")
    ordered = sorted(entries, key=lambda e: (-_ORDER.index(_NAMES[e.dtype]), e.name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in ordered:
        header[e.name] = {"dtype": _NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for e in ordered:
            loaded = e.load()
            whole = isinstance(loaded, torch.Tensor)
            written = 0
            for t in ([loaded] if whole else loaded):
                if t.dtype != e.dtype or tuple(t.shape[int(not whole):]) != tuple(e.shape[int(not whole):]):
                    raise ValueError(f"{e.name}: loaded {t.dtype} {tuple(t.shape)}, the header says {e.dtype} "
                                     f"{e.shape}")
                data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
                written += data.nbytes
                del t, data
            del loaded
            if written != e.nbytes:
                raise ValueError(f"{e.name}: {written} bytes written, the header says {e.nbytes}")
    return digest.hexdigest()
