"""`bitplan export imatrix`: the profile's input second moments in llama.cpp's GGUF imatrix format.

Per block linear, llama.cpp's imatrix stores `<gguf name>.in_sum2` (F32, ne [n_in, 1]: Σ_t x_t² of each input
column over the calibration tokens) and `<gguf name>.counts` (F32, ne [1, 1]: the number of tokens), with the
calibration described by `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`. The profile keeps
Σ_t x_t x_tᵀ of each layer (hessians/<half>/<layer>.safetensors, `xtx`); its diagonal summed over both halves is
in_sum2, the halves' token counts summed the count. llama-quantize reads the file with `--imatrix`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import BitplanError
from ..io import atomic_path, check_writable
from ..profile.hessians import HALVES, HESSIAN_DIR, factors_path
from .arch import ARCHITECTURES, TensorNames


@dataclass
class ImatrixExport:
    path: Path
    entries: int
    tokens: int
    chunk_size: int
    chunk_count: int
    skipped: list[str]


def _diag_and_tokens(path: Path) -> tuple[np.ndarray, int]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["bitplan"])
            if "xtx" not in fh.keys():
                raise BitplanError(f"{path} has no Σxxᵀ (xtx): the profile was made by an older bitplan; "
                                   "re-run `bitplan profile`")
            diag = fh.get_tensor("xtx").diagonal().double().numpy()
    except SafetensorError as e:
        raise BitplanError(f"the Hessian file {path} is damaged ({e}); re-run `bitplan profile`") from None
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"{path} is not a bitplan Hessian file ({type(e).__name__}: {e})") from None
    return diag, int(meta["tokens"])


def profile_layers(profile: Path) -> list[str]:
    folder = profile / HESSIAN_DIR / HALVES[0]
    if not folder.is_dir():
        raise BitplanError(f"{profile} has no {HESSIAN_DIR}/ (shipped profiles leave the factors out); an imatrix "
                           "needs the calibration statistics: run `bitplan profile MODEL --out FOLDER`")
    names = sorted(p.name[:-len(".safetensors")] for p in folder.glob("*.safetensors"))
    if not names:
        raise BitplanError(f"{folder} holds no layer factors")
    return names


def _calibration(profile: Path) -> dict:
    path = profile / "profile.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("calibration") or {})
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}


def export_imatrix(profile: str | Path, out: str | Path) -> ImatrixExport:
    """Write the importance matrix of the profile folder `profile` to the GGUF file `out` (atomically)."""
    profile = Path(profile)
    out = check_writable(out, "file", "imatrix file")
    if not profile.is_dir():
        raise BitplanError(f"profile folder not found: {profile}")
    layers = profile_layers(profile)
    blocks = [int(m.group(1)) for m in (re.search(r"\.(\d+)\.", n) for n in layers) if m]
    names = TensorNames(ARCHITECTURES["LlamaForCausalLM"], max(blocks, default=0) + 1)
    entries: list[tuple[str, np.ndarray, int]] = []
    skipped: list[str] = []
    for layer in layers:
        gname = names(f"{layer}.weight")
        if gname.startswith("token_embd"):  # a lookup has no input: llama.cpp's imatrix has no entry for it
            skipped.append(layer)
            continue
        total, tokens = None, 0
        for half in HALVES:
            diag, n_tok = _diag_and_tokens(factors_path(profile, layer, half))
            total = diag if total is None else total + diag
            tokens += n_tok
        entries.append((gname, total, tokens))
    if not entries:
        raise BitplanError(f"{profile} has factors for no linear layer")
    calib = _calibration(profile)
    tokens = max(e[2] for e in entries)
    chunk_size = int(calib.get("seqlen") or 0) or tokens
    chunk_count = max(tokens // chunk_size, 1)
    dataset = str(calib.get("source") or calib.get("text") or profile.name)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")   # no architecture key: llama.cpp's imatrix tool writes none
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for gname, sums, count in entries:
            writer.add_tensor(f"{gname}.in_sum2", sums.astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{gname}.counts", np.array([[count]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return ImatrixExport(path=out, entries=len(entries), tokens=tokens, chunk_size=chunk_size,
                         chunk_count=chunk_count, skipped=skipped)
