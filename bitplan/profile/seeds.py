"""Seeds derived from (run seed, purpose, key): every random draw depends on what it is for, never on order,
batching or how often a job was resumed."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    text = ":".join([str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (a CUDA generator draws other numbers than the CPU's from the same seed)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))
