"""`bitplan export gguf`: a bitplan checkpoint as one GGUF file that llama.cpp and transformers run.

Block linears in a ggml format keep the checkpoint's packed blocks byte for byte (rows reordered for the q/k
projections as llama.cpp's llama graph expects); fp16 modules and the float embedding / head are stored in the
types the caller names (quantized by the gguf package); 1-D tensors (norms, biases) in f32. Modules in bitplan's
rotated formats have no ggml layout and are refused.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from .. import __version__
from ..apply.checkpoint import CODEBOOK_PREFIX, load_tensors, read_quantization_config
from ..errors import BitplanError
from ..formats import get_format
from ..io import atomic_path, check_writable
from ..progress import Progress
from .arch import TensorNames, check_config, gguf_arch, permute_rows, qk_heads, write_hyperparameters
from .vocab import write_tokenizer

T = gguf.GGMLQuantizationType
FLOAT_TYPES = ("f32", "f16", "bf16")
# Types the gguf package quantizes itself (for tensors stored in float in the checkpoint)
EXPORT_TYPES = FLOAT_TYPES + ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# llama.cpp's file type for the most common tensor type (src/llama-model-loader.cpp guesses the same way)
_FILE_TYPE = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q4_0: "MOSTLY_Q4_0",
              T.Q4_1: "MOSTLY_Q4_1", T.Q5_0: "MOSTLY_Q5_0", T.Q5_1: "MOSTLY_Q5_1", T.Q8_0: "MOSTLY_Q8_0",
              T.Q2_K: "MOSTLY_Q2_K", T.Q3_K: "MOSTLY_Q3_K_M", T.Q4_K: "MOSTLY_Q4_K_M", T.Q5_K: "MOSTLY_Q5_K_M",
              T.Q6_K: "MOSTLY_Q6_K", T.IQ4_NL: "MOSTLY_IQ4_NL", T.IQ4_XS: "MOSTLY_IQ4_XS"}


def type_name(t: T) -> str:
    """ggml's own spelling of a type (`q4_K`, `iq4_xs`, `f16`), as llama.cpp prints and parses it."""
    name = t.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def ggml_type(name: str) -> T:
    """A type name as the command line takes it (`q8_0`, `f16`) → the ggml type."""
    try:
        return T[name.upper()]
    except KeyError:
        raise BitplanError(f"unknown ggml type {name!r}; choose one of {', '.join(EXPORT_TYPES)}") from None


def _export_type(name: str, option: str) -> T:
    if name.lower() not in EXPORT_TYPES:
        raise BitplanError(f"{option} {name}: choose one of {', '.join(EXPORT_TYPES)} (types the gguf package "
                           "quantizes; for other ggml types, plan the tensor in that format)")
    return ggml_type(name)


def format_ggml_type(fmt_name: str) -> T | None:
    """The ggml type of a bitplan format stored as ggml blocks, or None for one that is not."""
    fmt = get_format(fmt_name)
    if getattr(fmt, "kind", None) != "ggml":
        return None
    return T(int(fmt.ggml_type))


@dataclass
class ExportedTensor:
    name: str             # GGUF name
    source: str           # checkpoint tensor
    type: T
    shape: tuple[int, ...]  # [rows, row length] as the checkpoint has it
    nbytes: int
    origin: str           # "blocks" (copied), "quantized" (by the gguf package), "float"


@dataclass
class GgufExport:
    path: Path
    arch: str
    tensors: list[ExportedTensor]
    file_bytes: int
    block_linear_params: int
    block_linear_bits: int
    params: int
    pre_tokenizer: str
    notes: list[str] = field(default_factory=list)

    @property
    def block_linear_bpw(self) -> float:
        return self.block_linear_bits / max(self.block_linear_params, 1)

    @property
    def file_bpw(self) -> float:
        return self.file_bytes * 8 / max(self.params, 1)

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(type_name(t.type) for t in self.tensors).most_common())


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy() if t.is_floating_point() else t.detach().numpy()


def _store_float(data: np.ndarray, want: T, name: str, notes: list[str]) -> tuple[np.ndarray, T]:
    """`data` (float32) as `want`, or f16 where the row length does not fill whole blocks of `want`."""
    if data.ndim < 2 or want == T.F32:
        return data.astype(np.float32), T.F32
    if want == T.F16:
        return data.astype(np.float16), T.F16
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if data.shape[-1] % block:
        notes.append(f"{name}: rows of {data.shape[-1]} do not fill {want.name.lower()} blocks of {block}; "
                     "stored as f16")
        return data.astype(np.float16), T.F16
    return gguf.quants.quantize(data, want), want


def export_gguf(checkpoint: str | Path, out: str | Path, embedding_type: str = "q8_0", output_type: str = "q8_0",
                other_type: str = "f16", progress: bool = True) -> GgufExport:
    """Write the bitplan checkpoint folder `checkpoint` as the GGUF file `out` (atomically)."""
    from transformers import AutoConfig

    from ..models import _quiet_transformers

    folder = Path(checkpoint)
    out = check_writable(out, "file", "GGUF file")
    want_embd = _export_type(embedding_type, "--embedding-type")
    want_out = _export_type(output_type, "--output-type")
    want_other = _export_type(other_type, "--other-type")
    if not (folder / "config.json").is_file():
        raise BitplanError(f"no bitplan checkpoint at {folder} (config.json missing)")
    qc = read_quantization_config(folder)
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(folder)
    arch = gguf_arch(config)
    check_config(config)

    modules: dict[str, str] = dict(qc["modules"])
    types: dict[str, T | None] = {}
    refused = []
    for name, fmt_name in modules.items():
        t = format_ggml_type(fmt_name)
        if t is None and fmt_name != "fp16":
            refused.append(f"{name} ({fmt_name})")
        types[name] = t
    if refused:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise BitplanError(f"{len(refused)} module(s) are in rotated bitplan formats that no ggml type stores "
                           f"exactly: {', '.join(refused[:3])}{more}; solve the plan with `--formats ggml` and apply "
                           "it again")

    tensors = load_tensors(folder, qc)
    names = TensorNames(arch, config.num_hidden_layers)
    notes: list[str] = []
    jobs: list[tuple[str, str]] = []   # (hf tensor name, checkpoint key)
    for name in modules:
        jobs.append((f"{name}.weight", f"{name}.blocks" if types[name] is not None else f"{name}.weight"))
        if f"{name}.bias" in tensors:
            jobs.append((f"{name}.bias", f"{name}.bias"))
    prefixes = tuple(f"{name}." for name in modules)
    for key in tensors:
        if key.startswith(prefixes) or key.startswith(CODEBOOK_PREFIX) or "rotary" in key or key.endswith("inv_freq"):
            continue
        jobs.append((key, key))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        jobs = [j for j in jobs if names(j[0]) != "output.weight"]

    def order(job):
        m = re.match(r"blk\.(\d+)\.", names(job[0]))
        g = names(job[0])
        return (0, 0, g) if g.startswith("token_embd") else (1, int(m.group(1)), g) if m else (2, 0, g)

    jobs.sort(key=order)
    for key in [k for _, k in jobs]:
        if key not in tensors:
            raise BitplanError(f"the checkpoint has no tensor {key}; it is incomplete or not of this bitplan")

    exported: list[ExportedTensor] = []
    bl_params = bl_bits = params = 0
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        source = json.loads((folder / "config.json").read_text())
        writer.add_name(str(source.get("_model_name_or_path") or folder.name))
        write_hyperparameters(writer, config)
        tok = write_tokenizer(writer, folder, config.vocab_size)
        with Progress(enabled=progress) as prog:
            task = prog.task("export gguf", len(jobs))
            for hf_name, key in jobs:
                gname = names(hf_name)
                t = tensors[key]
                module = hf_name.rsplit(".", 1)[0]
                heads = qk_heads(hf_name, config) if arch.permute_qk else None
                if key.endswith(".blocks"):
                    raw, qtype, origin = t.numpy().astype(np.uint8, copy=False), types[module], "blocks"
                    block, size = gguf.GGML_QUANT_SIZES[qtype]
                    if raw.ndim != 2 or raw.shape[1] % size:
                        raise BitplanError(f"{key} has shape {list(raw.shape)}, not whole {qtype.name} blocks of "
                                           f"{size} bytes per row")
                    if heads:
                        raw = permute_rows(raw, heads)
                    shape = (raw.shape[0], raw.shape[1] // size * block)
                    writer.add_tensor(gname, np.ascontiguousarray(raw), raw_dtype=qtype)
                    data_bytes = raw.nbytes
                else:
                    data = _as_numpy(t)
                    if heads:
                        data = permute_rows(data, heads)
                    want = want_embd if gname.startswith("token_embd") else want_out if gname.startswith("output.") \
                        else want_other
                    stored, qtype = _store_float(data, want, gname, notes)
                    origin = "float" if qtype in (T.F32, T.F16, T.BF16) else "quantized"
                    shape = tuple(data.shape)
                    writer.add_tensor(gname, np.ascontiguousarray(stored),
                                      raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
                    data_bytes = stored.nbytes
                n = int(np.prod(shape))
                params += n
                if module in modules and hf_name.endswith(".weight") and ".layers." in hf_name:
                    bl_params += n
                    bl_bits += data_bytes * 8
                exported.append(ExportedTensor(gname, key, qtype, shape, data_bytes, origin))
                task.advance()
        # the most common type of the matrices (llama-quantize names a file by its matrices' type; 1-D tensors
        # are f32 in every file)
        counts = Counter(e.type for e in exported if len(e.shape) == 2) or Counter([T.F32])
        top = counts.most_common(1)[0][0]
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPE.get(top, "ALL_F32")])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("bitplan.version", __version__)
        writer.add_string("bitplan.plan", json.dumps({"modules": modules, "plan": qc.get("plan"),
                                                      "rounding": qc.get("rounding")}, default=str))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return GgufExport(path=out, arch=arch.name, tensors=exported, file_bytes=out.stat().st_size,
                      block_linear_params=bl_params, block_linear_bits=bl_bits, params=params,
                      pre_tokenizer=tok["pre"], notes=notes)
