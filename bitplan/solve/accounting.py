"""Storage accounting shared by the solver, the plan and its re-check: every bit `apply` writes counts.

- Block linears: `Format.storage_bits(m, n)`, exact (codes with padding, fp16 scales and zeros, rotation seeds).
- Grid codebooks: stored once per checkpoint for each distinct grid (p, n) used, whatever its group size.
- Planned embedding and head (a profile with `outer_layers`): plan layers like the block linears, each at its
  format's `storage_bits`; a tied head is the embedding's one tensor, counted once.
- Extras (byte budgets and file totals only): the tensors the plan does not hold (the embedding and an untied head
  of a profile without their records) stay fp16; a tied head shares the embedding's storage and costs nothing; the
  remaining parameters the profile counts (norms, biases) are fp16.
  The safetensors header and the fp32 storage of 1-D tensors are not counted here; a whole-file budget sets aside
  a bound on them first (`api.container_reserve_bits`), so model.safetensors stays within it. config.json is apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..formats import Format
from ..profile.schema import Profile

FP16_BITS = 16


def codebook_key(fmt: Format) -> str | None:
    """The grid a format's codebook belongs to: formats that differ only in group size share one table."""
    if not fmt.codebook_bits:
        return None
    if fmt.kind == "grid":
        return f"grid-p{fmt.vector_dim}-n{getattr(fmt, 'levels', fmt.code_bits)}"
    return fmt.name


def codebooks(formats: list[Format]) -> dict[str, int]:
    """Codebook bits of each distinct grid among `formats`."""
    out: dict[str, int] = {}
    for f in formats:
        key = codebook_key(f)
        if key is not None:
            out[key] = max(out.get(key, 0), int(f.codebook_bits))
    return out


@dataclass(frozen=True)
class ExtrasAccount:
    tensors: list[dict]      # [{"name", "kind", "shape", "bits", "note"}]
    other_params: int        # parameters outside block linears and embedding/head (norms, biases)
    bits: int                # all of it, fp16

    def to_json(self) -> dict:
        planned = any(t.get("planned") for t in self.tensors)
        return {"treatment": ("the embedding and an untied head are plan layers (their storage is in the layers'); "
                              if planned else "fp16 (embedding and untied head); ")
                             + "a tied head shares the embedding's storage; other parameters such as norms "
                               "counted as fp16",
                "tensors": self.tensors, "other_params": self.other_params, "bits": self.bits}


def extras_account(profile: Profile) -> ExtrasAccount:
    """What the plan's layers do not hold: fp16 embedding/head of a profile without their records, and the other
    parameters (norms, biases) in fp16."""
    planned = {r.name for r in profile.outer_layers}
    tensors, bits, unique = [], 0, 0
    for e in profile.extras:
        tied = e.tied_to is not None
        unique += 0 if tied else e.params
        if e.name in planned:
            tensors.append({"name": e.name, "kind": e.kind, "shape": list(e.shape), "planned": True, "bits": 0})
            continue
        b = 0 if tied else FP16_BITS * e.params
        tensors.append({"name": e.name, "kind": e.kind, "shape": list(e.shape),
                        "format": "plan" if tied and e.tied_to in planned else "fp16", "bits": b,
                        **({"tied_to": e.tied_to} if tied else {})})
        bits += b
    block = sum(r.params for r in profile.layers)
    n_params = profile.model.get("n_params")
    other = 0
    if isinstance(n_params, int) and n_params > block + unique:
        other = n_params - block - unique
    return ExtrasAccount(tensors=tensors, other_params=other, bits=bits + FP16_BITS * other)
