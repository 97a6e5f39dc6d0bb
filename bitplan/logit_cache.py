"""A size-capped on-disk cache of reference logits, so comparing many candidates runs the reference once.

Entries are keyed by the reference's weights hash and the window's tokens; each is one safetensors file.
When the cache grows past its cap the oldest entries are deleted first.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path


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
            logits = load_file(path)["logits"]
        except Exception:  # a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None
        path.touch()  # recently used entries are evicted last
        return logits

    def put(self, key: str, logits: torch.Tensor) -> None:
        size = logits.numel() * logits.element_size()
        if size > self.max_bytes:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / f"{key}.safetensors") as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
