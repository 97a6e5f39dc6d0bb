"""`bitplan export imatrix`: llama.cpp's imatrix entries equal Σ x² of each input column over the calibration
tokens, computed here from the layers' inputs in float64."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.export import export_imatrix
from bitplan.models import find_linears
from bitplan.profile.run import profile_model

from tests.profile.helpers import tiny_llama, token_ids

SAMPLES, SEQLEN = 8, 16


def column_sums(model, ids) -> tuple[dict[str, np.ndarray], int]:
    sums, handles = {}, []
    for info in find_linears(model):
        def hook(module, args, output, name=info.name):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        handles.append(model.get_submodule(info.name).register_forward_hook(hook))
    with torch.inference_mode():
        for row in ids:
            model(row[None])
    for h in handles:
        h.remove()
    return sums, ids.numel()


def gguf_name(hf: str) -> str:
    block, part = hf.split(".")[2], hf.rsplit(".", 1)[1]
    return f"blk.{block}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[part] + ".weight"


def test_imatrix_equals_the_calibration_inputs(tmp_path):
    model, ids = tiny_llama(), token_ids(SAMPLES, SEQLEN)
    prof = tmp_path / "prof"
    profile_model(model, ids, out_dir=prof, sketch_chunk=4, noise_samples=2, formats="int4-g32,fp16",
                  batch_size=2, progress=False, judge_samples=0)
    out = tmp_path / "imatrix.gguf"
    result = export_imatrix(prof, out)
    expected, tokens = column_sums(tiny_llama(), ids)

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.chunk_size"].contents() == SEQLEN
    assert reader.fields["imatrix.chunk_count"].contents() == SAMPLES
    assert len(reader.fields["imatrix.datasets"].contents()) == 1
    tensors = {t.name: t for t in reader.tensors}
    for name, sums in expected.items():
        s, c = tensors[gguf_name(name) + ".in_sum2"], tensors[gguf_name(name) + ".counts"]
        assert s.tensor_type == c.tensor_type == gguf.GGMLQuantizationType.F32
        assert s.shape.tolist() == [sums.size, 1] and c.shape.tolist() == [1, 1]   # ggml's ne
        assert float(np.asarray(c.data).reshape(-1)[0]) == tokens
        got = np.asarray(s.data, dtype=np.float64).reshape(-1)
        assert np.allclose(got, sums, rtol=1e-5, atol=0), name
    names = {n.rsplit(".", 1)[0] for n in tensors}
    assert {gguf_name(n) for n in expected} <= names and names <= {gguf_name(n) for n in expected} | {"output.weight"}
    assert result.entries == len(names) and result.tokens == tokens


def test_a_profile_without_hessians_is_refused(tmp_path):
    prof = tmp_path / "shipped"
    prof.mkdir()
    (prof / "profile.json").write_text("{}")
    with pytest.raises(BitplanError, match="no hessians/.*bitplan profile"):
        export_imatrix(prof, tmp_path / "imatrix.gguf")
    assert not (tmp_path / "imatrix.gguf").exists()
