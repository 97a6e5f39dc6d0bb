"""`bitplan export compressed-tensors`: a checkpoint in vLLM's integer formats as a folder vLLM and transformers load.

The folder is compressed-tensors' `pack-quantized` layout (version `CT_VERSION`): per quantized linear
`<m>.weight_packed` (int32 [out, ceil(in·b/32)]: the signed codes offset by 2^(b−1), packed densely along the
input), `<m>.weight_scale` (fp16 [out, in/g]), `<m>.weight_shape` (int64 [out, in]) and, for an asymmetric scheme,
`<m>.weight_zero_point` (the signed zero points packed along the output); every other tensor in fp16; config.json's
`quantization_config` with one config group per format and every unquantized linear (the head among them) in
`ignore`; the tokenizer files and generation_config.json. Codes are moved, never dequantized: bitplan's `sint` code
u = q + 2^(b−1) becomes compressed-tensors' q, and a `uint` code q and zero z become q − 2^(b−1) and z − 2^(b−1)
(x̂ = (q − z)·scale is unchanged); compressed-tensors' own pack_to_int32 writes the words.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..apply.checkpoint import (CODEBOOK_PREFIX, WEIGHTS, file_sha256, read_quantization_config,
                                written_files)
from ..errors import BitplanError
from ..formats import Format, get_format
from ..io import atomic_folder, check_writable
from ..models import find_linears, find_outer
from ..progress import Progress
from ..solve.runtime import runtime_violation

CT_VERSION = "0.20.1"   # the layout written: dense cross-word packing (compressed-tensors ≥ 0.18)
FORMAT = "pack-quantized"
MAX_SHARD_BYTES = 5 * 10**9
_COPIED = ("generation_config.json",)


@dataclass
class CompressedTensorsExport:
    path: Path
    schemes: dict[str, list[str]]     # config group (the bitplan format) → its modules, in model order
    ignored: list[str]                # linears kept in fp16, the head among them
    shards: list[str]
    file_bytes: int                   # the safetensors shards together
    version: str = CT_VERSION

    def scheme_args(self) -> dict[str, dict]:
        """Bits, group size and symmetry of each config group."""
        return {name: _args(get_format(name)) for name in self.schemes}


def _compressed_tensors():
    """The installed compressed-tensors, refused unless it is the version whose layout is written."""
    try:
        import compressed_tensors
    except ModuleNotFoundError:
        raise BitplanError("bitplan export compressed-tensors needs the compressed-tensors package: "
                           "pip install 'bitplan[vllm]'") from None
    if compressed_tensors.__version__ != CT_VERSION:
        raise BitplanError(f"bitplan writes compressed-tensors {CT_VERSION}'s layout, but "
                           f"{compressed_tensors.__version__} is installed: pip install 'bitplan[vllm]'")
    return compressed_tensors


def _args(fmt: Format) -> dict:
    return {"num_bits": fmt.code_bits, "type": "int", "symmetric": not fmt.has_zero, "strategy": "group",
            "group_size": fmt.group_size}


def _skeleton(folder: Path) -> nn.Module:
    """The checkpoint's model without weights (meta tensors): its module names and shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import _quiet_transformers

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class _Layer:   # a checkpoint's layer as solve/runtime.py checks a plan's
    name: str
    format: str
    block: int
    kind: str
    shape: tuple[int, int]


def vllm_problem(modules: dict[str, str], model: nn.Module) -> str | None:
    """Why vLLM cannot run the checkpoint of `model` whose modules are in `modules` (name → format), naming the
    layer; None when it can. The rule is the one `bitplan solve --runtime vllm` plans by."""
    layers = [_Layer(i.name, modules.get(i.name, "fp16"), i.block, i.kind, i.shape)
              for i in find_linears(model) + find_outer(model)]
    known = {lp.name for lp in layers}
    stray = next((name for name in modules if name not in known), None)
    if stray is not None:
        return f"{stray} ({modules[stray]}) is no linear layer, embedding or head of the model"
    problem = runtime_violation(layers, "vllm")
    if problem and "--runtime" not in problem:
        problem += "; solve with --runtime vllm and apply again"
    return problem


def _check_sha(folder: Path, qc: dict) -> Path:
    path = folder / WEIGHTS
    if not path.is_file():
        raise BitplanError(f"{folder} is incomplete: {WEIGHTS} is missing")
    expected = (qc.get("files") or {}).get(WEIGHTS)
    if not expected:
        raise BitplanError(f"{folder}/config.json records no sha256 for {WEIGHTS}; re-make the checkpoint with "
                           "`bitplan apply`")
    if file_sha256(path) != expected:
        raise BitplanError(f"{path} is truncated or corrupted (its sha256 differs from the one in config.json)")
    return path


def ct_tensors(fmt: Format, packed: dict[str, torch.Tensor], m: int, n: int) -> dict[str, torch.Tensor]:
    """One layer's packed bitplan tensors (`codes`, `scale`, `zero`) as compressed-tensors' `weight_*` tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if fmt.kind not in ("sint", "uint"):   # other codes mean other values: int's zero is an fp16 minimum
        raise BitplanError(f"{fmt.name} has no compressed-tensors form; only sint and uint formats do")
    qw = fmt.unpack(packed, m, n)   # checks shapes and dtypes; codes int32 [m, n]
    offset = 1 << (fmt.code_bits - 1)
    # sint codes are stored offset by 2^(b−1), uint codes unsigned: either way CT's signed code is code − 2^(b−1)
    q = (qw.codes - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(q, fmt.code_bits),
           "weight_scale": packed["scale"].to(torch.float16).contiguous(),
           "weight_shape": torch.tensor([m, n], dtype=torch.int64)}
    if fmt.has_zero:
        zero = (qw.params.zero.to(torch.int32) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zero, fmt.code_bits, packed_dim=0)
    return out


class _Shards:
    """safetensors shards of at most `limit` bytes, filled in order; named when the count is known."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.files: list[Path] = []
        self.where: dict[str, int] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.size + size > self.limit:
            self.flush()
        for key, t in tensors.items():
            self.pending[key] = t.contiguous()
            self.where[key] = len(self.files)
        self.size += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        count = len(self.files)
        names = [WEIGHTS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self.files, names):
            os.replace(path, self.folder / name)
        if count > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for k, i in sorted(self.where.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _quantization_config(schemes: dict[str, list[str]], ignored: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {name: QuantizationScheme(targets=targets, weights=QuantizationArgs(**_args(get_format(name))),
                                       format=FORMAT)
              for name, targets in schemes.items()}
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                ignore=ignored)
    # the keys and order compressed-tensors' own ModelCompressor.update_config writes
    return {"version": CT_VERSION, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **config.model_dump(exclude=["quant_method"])}


def _check_out(out: Path) -> Path:
    check_writable(out, "folder", "export folder")
    if out.is_dir() and any(out.iterdir()):
        raise BitplanError(f"{out} exists and is not empty; give a new folder (or remove it)")
    return out


def export_compressed_tensors(checkpoint: str | Path, out_dir: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                              progress: bool = True) -> CompressedTensorsExport:
    """Write the bitplan checkpoint `checkpoint` (sint/uint/fp16 layers) as a compressed-tensors folder `out_dir`,
    layer by layer; the folder appears whole or not at all."""
    folder, out = Path(checkpoint), _check_out(Path(out_dir))
    if not (folder / "config.json").is_file():
        raise BitplanError(f"no bitplan checkpoint at {folder} (config.json missing)")
    if max_shard_bytes < 1:
        raise BitplanError(f"the shard size must be positive, got {max_shard_bytes}")
    qc = read_quantization_config(folder)
    _compressed_tensors()
    model = _skeleton(folder)
    modules: dict[str, str] = dict(qc["modules"])
    problem = vllm_problem(modules, model)
    if problem:
        raise BitplanError(f"vLLM cannot run this checkpoint: {problem}")

    quantized = {name: get_format(f) for name, f in modules.items() if get_format(f).kind != "fp16"}
    order = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    schemes: dict[str, list[str]] = {}
    for name in order:
        if name in quantized:
            schemes.setdefault(quantized[name].name, []).append(name)
    schemes = dict(sorted(schemes.items(), key=lambda kv: (get_format(kv[0]).code_bits, kv[0])))
    ignored = [name for name in order if name not in quantized]
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    weights = _check_sha(folder, qc)
    config = json.loads((folder / "config.json").read_text())
    with atomic_folder(out) as tmp:   # `out` is missing or empty (checked above)
        shards = _Shards(tmp, max_shard_bytes)
        with safe_open(str(weights), framework="pt") as f, Progress(enabled=progress) as prog:
            keys = list(f.keys())
            task = prog.task("export compressed-tensors", len(keys))
            done: set[str] = set()   # the packed keys of the layers written
            for key in keys:
                module, _, part = key.rpartition(".")
                if key.startswith(CODEBOOK_PREFIX) or key in done:
                    task.advance()
                    continue
                if module in quantized and part != "bias":
                    fmt = quantized[module]
                    suffixes = ("codes", "scale", "zero") if fmt.has_zero else ("codes", "scale")
                    parts = [f"{module}.{p}" for p in suffixes]
                    wrong = next((p for p in parts if p not in keys), None) or (key if key not in parts else None)
                    if wrong is not None:
                        raise BitplanError(f"{module} ({fmt.name}) is stored as {', '.join(parts)}, but {wrong} is "
                                           f"{'missing' if wrong in parts else 'there too'}: the checkpoint is damaged")
                    packed = {p.rpartition(".")[2]: f.get_tensor(p) for p in parts}
                    tensors = ct_tensors(fmt, packed, *shapes[module])
                    shards.add({f"{module}.{k}": v for k, v in tensors.items()})
                    done.update(parts)
                else:
                    t = f.get_tensor(key)
                    shards.add({key: t.to(torch.float16) if t.is_floating_point() else t})
                task.advance()
        names = shards.finish()
        for name in sorted(written_files(folder) - {"config.json", WEIGHTS} | set(_COPIED)):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        config["quantization_config"] = _quantization_config(schemes, ignored)
        config["dtype"] = "float16"
        if "torch_dtype" in config:
            config["torch_dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return CompressedTensorsExport(path=out, schemes=schemes, ignored=ignored, shards=names,
                                   file_bytes=sum((out / n).stat().st_size for n in names))
