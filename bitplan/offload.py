"""Where a plain model's weights live while `bitplan eval` runs it: all on the device, or as many decoder blocks as
fit there and the rest offloaded by accelerate (`device_map`), to host memory from a GPU and to disk from the CPU.

Offloaded blocks are brought to the device for each forward pass, so an offloaded evaluation computes the same
logits as one in memory, only slower. A safetensors model offloaded to disk is read from its own shards (accelerate
maps them; nothing is copied); other weight files are written once into a temporary folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BitplanError
from .devices import BASE_HOST_BYTES, RUNTIME_HOST_BYTES, available, checkpoint_dtype, fmt_bytes
from .shards import Shards

GIB = 2**30
PROCESS_BYTES = int(BASE_HOST_BYTES + RUNTIME_HOST_BYTES)   # the process itself, once a model has run


@dataclass(frozen=True)
class Placement:
    """The weights' size in the dtype they are held in, and how much of the device they may take."""
    device: torch.device
    weight_bytes: int
    budget_bytes: int            # the device memory the weights may take
    host_bytes: int = 0          # from a GPU: the host memory offloaded blocks may take (beyond: disk)

    @property
    def offloaded(self) -> bool:
        return self.weight_bytes > self.budget_bytes

    def max_memory(self) -> dict:
        """accelerate's `max_memory`: the device's budget, and from a GPU the host's for what does not fit."""
        if self.device.type == "cpu":
            return {"cpu": self.budget_bytes}
        return {self.device.index or 0: self.budget_bytes, "cpu": self.host_bytes}


def weight_bytes(path: Path, dtype: torch.dtype, config: dict | None = None) -> int:
    """The bytes of the folder's weights once loaded in `dtype`: from the safetensors headers (floating tensors at
    `dtype`'s size, others at their own). Weights saved otherwise: their files' size, scaled from the dtype the
    config names (float32 when it names none) to `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    shards = Shards.open(path)
    if shards is None:
        stored = torch.empty((), dtype=checkpoint_dtype(config) or torch.float32).element_size()
        files = sum(f.stat().st_size for pattern in ("*.bin", "*.pt", "*.pth") for f in path.glob(pattern))
        return files * size // stored
    total = 0
    for info in shards.tensors.values():
        numel = 1
        for d in info.shape:
            numel *= d
        total += numel * (size if info.dtype.is_floating_point else torch.empty((), dtype=info.dtype).element_size())
    return total


def check_max_memory(max_memory_gb: float | None) -> None:
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise BitplanError(f"--max-memory must be positive (got {max_memory_gb})")


def device_budget(device: torch.device, working_bytes: int, max_memory_gb: float | None = None) -> int:
    """What a model may take on `device`: `max_memory_gb` GiB when given, else what is free there less
    `working_bytes` (activations, logits) and, on the CPU, the process itself."""
    check_max_memory(max_memory_gb)
    if max_memory_gb is not None:
        return int(max_memory_gb * GIB)
    free = available(str(device))
    if device.type == "cpu":
        return max(0, int(free.host_bytes) - working_bytes - PROCESS_BYTES)
    return max(0, int(free.device_bytes or 0) - working_bytes)


def plan_placement(path: Path, config: dict, dtype: torch.dtype, device: torch.device, working_bytes: int,
                   max_memory_gb: float | None = None) -> Placement:
    """How a plain model in `path` is placed for evaluation on `device` (its weights within `device_budget`)."""
    weights = weight_bytes(path, dtype, config)
    budget = device_budget(device, working_bytes, max_memory_gb)
    host = 0 if device.type == "cpu" else max(0, int(available("cpu").host_bytes) - PROCESS_BYTES)
    return Placement(device, weights, budget, host)


def load_kwargs(placement: Placement, offload_folder: Path) -> dict:
    """from_pretrained's arguments that place the weights as `placement` says."""
    if not placement.offloaded:
        return {} if placement.device.type == "cpu" else {"device_map": {"": placement.device}}
    return {"device_map": "auto", "max_memory": placement.max_memory(), "offload_folder": str(offload_folder)}


def block_places(device_map: dict, blocks_prefix: str, n_blocks: int) -> list[set[str]]:
    """Where each decoder block's weights are, from accelerate's device_map (module name → place): the places of
    the entries that hold the block, hold a part of it, or hold a module around it."""
    places = []
    for i in range(n_blocks):
        block = f"{blocks_prefix}.{i}"
        places.append({str(v) for k, v in device_map.items()
                       if k == "" or k == block or k.startswith(block + ".") or block.startswith(k + ".")})
    return places


def describe(placement: Placement, device_map: dict | None, blocks_prefix: str, n_blocks: int, spec: str) -> str:
    """One line on where the weights went, printed before an offloaded evaluation starts."""
    here = "cpu" if placement.device.type == "cpu" else str(placement.device.index or 0)
    places = block_places(device_map or {}, blocks_prefix, n_blocks)
    kept = sum(1 for p in places if p == {here})
    elsewhere = sorted({p for ps in places for p in ps if p != here} - {""})
    where = "memory" if placement.device.type == "cpu" else str(placement.device)
    return (f"{spec}: its weights take {fmt_bytes(placement.weight_bytes)}, and {fmt_bytes(placement.budget_bytes)} "
            f"of {where} is theirs: accelerate keeps {kept} of {n_blocks} decoder blocks there and offloads the "
            f"others to {' and '.join(_place_name(p) for p in elsewhere) or 'nowhere'}, reading them in again for "
            "every window, so this evaluation runs slower")


def _place_name(place: str) -> str:
    return {"cpu": "host memory", "disk": "disk"}.get(place, f"cuda:{place}")
