"""`--device` and `--dtype`: what a user asks for, as a torch.device and a torch.dtype.

`auto` device is the first CUDA device when torch sees one (under torchrun, LOCAL_RANK's), else the CPU. `auto`
dtype keeps a checkpoint's own weight dtype (bf16 for most current models) on a GPU, and float32 on the CPU, where
bf16 matmuls are slow on most processors and float32 reproduces profiles and checkpoints made before devices
existed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import BitplanError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
# Measured on this repository's CPU machine (docs/big-models.md, "How the forecast is made"):
# resident memory of a process with torch, transformers and bitplan imported and the model's code loaded;
BASE_HOST_BYTES = 0.22 * 2 ** 30
# what the first forward+backward leaves resident (autograd's engine, the math libraries' buffers): a 16-token
# pass of the default model raised the resident memory by 0.32 GiB, and it stays for the rest of the process
RUNTIME_HOST_BYTES = 0.32 * 2 ** 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` → a device torch can use here, or a BitplanError saying what is."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        # under torchrun one GPU per process: the one torchrun's LOCAL_RANK names (0 for a single process)
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device(f"cuda:{local % cuda_count}" if cuda_count else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0 if spec == "cuda" else spec.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise BitplanError(f"--device {spec!r}: the CUDA index must be a number, as in cuda:0") from None
        if cuda_count == 0:
            raise BitplanError(f"--device {spec}: torch sees no CUDA device here (torch {torch.__version__}); "
                               "use --device cpu, or install a CUDA build of torch")
        if not 0 <= index < cuda_count:
            raise BitplanError(f"--device {spec}: torch sees {cuda_count} CUDA device(s), cuda:0 to "
                               f"cuda:{cuda_count - 1}")
        return torch.device(f"cuda:{index}")
    raise BitplanError(f"unknown --device {spec!r}; use one of {', '.join(DEVICE_CHOICES)}")


def checkpoint_dtype(config: dict | None) -> torch.dtype | None:
    """The weight dtype a Hugging Face config.json names (`dtype`, or the older `torch_dtype`), if a float one."""
    if not config:
        return None
    name = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return DTYPES.get(name)


def resolve_dtype(spec: str | torch.dtype | None = "auto", device: torch.device | str = "cpu",
                  config: dict | None = None) -> torch.dtype:
    """`auto`, `float32`, `bfloat16` or `float16` → the dtype the model's weights are held in on `device`."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise BitplanError(f"dtype {spec} is not one of {', '.join(DTYPES)}")
        return spec
    spec = (spec or "auto").strip().lower().replace("torch.", "")
    if spec == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        return checkpoint_dtype(config) or torch.bfloat16
    if spec in ("fp32", "float"):
        spec = "float32"
    if spec in ("bf16",):
        spec = "bfloat16"
    if spec in ("fp16", "half"):
        spec = "float16"
    if spec not in DTYPES:
        raise BitplanError(f"unknown --dtype {spec!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


@dataclass
class Available:
    """Memory free now: on the host, and on the device asked about."""
    host_bytes: float
    device_bytes: float | None       # None: not on a GPU (or none here to ask)


def available(device: str = "cpu") -> Available:
    """Free host memory (psutil) and, on CUDA, the device's free memory."""
    import psutil

    host = float(psutil.virtual_memory().available)
    dev = None
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            dev = float(torch.cuda.mem_get_info(index)[0])
    return Available(host, dev)


def fmt_bytes(b: float) -> str:
    """A size for people: 512 MiB, 1.9 GiB, 1.2 TiB."""
    if b >= 1000 * 2 ** 30:
        return f"{b / 2 ** 40:.1f} TiB"
    if b >= 2 ** 30 / 10:
        return f"{b / 2 ** 30:.1f} GiB"
    return f"{b / 2 ** 20:.0f} MiB"
