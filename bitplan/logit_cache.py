"""A size-capped on-disk cache of reference logits, so comparing many candidates runs the reference once.

Entries are keyed by the reference's weights hash and the window's tokens; each is one safetensors file whose
metadata holds the sha256 of its logits' bytes: an entry that does not match (a flipped bit, a cut-short write)
is deleted and recomputed, never trusted. When the cache grows past its cap the oldest entries are deleted first.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import atomic_path

MIN_CAP_BYTES = 2 * 2**30
_ENTRY_OVERHEAD = 4096   # a safetensors header and file-system slack per entry


def default_cap(windows: int, seqlen: int, vocab: int) -> int:
    """A cap that holds one evaluation's reference logits (float32 [seqlen, vocab] per window), at least 2 GiB:
    a smaller cap evicts the entries the next evaluation needs (the default evaluation of a 49,152-token
    vocabulary is 32 × 512 × 49,152 × 4 B ≈ 3.2 GB)."""
    need = windows * (seqlen * vocab * 4 + _ENTRY_OVERHEAD)
    return max(MIN_CAP_BYTES, math.ceil(need * 1.01))


def _digest(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()


@dataclass
class LogitCache:
    root: Path
    max_bytes: int

    def key(self, model_hash: str, window: torch.Tensor) -> str:
        h = hashlib.sha256(model_hash.encode())
        h.update(window.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get("sha256")
                logits = f.get_tensor("logits")
            if expected != _digest(logits):
                raise ValueError("checksum mismatch")
        except Exception:  # a damaged entry (or one without a checksum) is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None
        path.touch()  # recently used entries are evicted last
        return logits

    def put(self, key: str, logits: torch.Tensor) -> None:
        size = logits.numel() * logits.element_size()
        if size > self.max_bytes:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        logits = logits.contiguous()
        with atomic_path(self.root / f"{key}.safetensors") as tmp:
            save_file({"logits": logits}, str(tmp), metadata={"sha256": _digest(logits)})
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
