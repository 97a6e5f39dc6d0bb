"""A large matrix whose rows round alone is rounded a block of rows at a time, with the whole matrix's result."""
from __future__ import annotations

import pytest
import torch

import bitplan.apply.run as apply_run
import bitplan.resources as resources
from bitplan.apply import apply_formats
from bitplan.apply.layer import quantize_layer, quantize_rows, rows_round_alone
from bitplan.errors import BitplanError
from bitplan.formats import get_format
from bitplan.models import load_model

from tests.apply.test_embedding import EMB, model_dir, plan_formats  # noqa: F401 (model_dir: a fixture)
from tests.test_linalg import spd

FORMATS = ["q4_0", "q8_0", "q5_1", "iq4_nl", "q4_K", "q6_K", "sint4-g64", "uint3-g32",   # no rotation
           "int4-g64", "int2-g128", "higgs-p2-n64-g64", "higgs-p1-n16-g128"]                 # rotated


def weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * torch.linspace(0.5, 2.0, n)   # columns of unequal scale


def blocks_of(W: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield W[start:start + size]
        start += size


@pytest.mark.parametrize("rounding", ["rtn", "ldlq"])
@pytest.mark.parametrize("name", FORMATS)
def test_rows_in_blocks_give_the_whole_matrix_bytes(name, rounding):
    fmt = get_format(name)
    m, n = 96, 256
    W = weight(m, n)
    H = spd(n, seed=1).float() if rounding == "ldlq" else None
    whole = quantize_layer("model.layers.0.mlp.up_proj", W, fmt, rounding, H_in=H)
    rows = quantize_rows("model.layers.0.mlp.up_proj", blocks_of(W, [32, 16, 48]), (m, n), fmt, rounding, H_in=H)
    assert rows.tensors.keys() == whole.tensors.keys()
    for key, t in whole.tensors.items():
        assert torch.equal(rows.tensors[key], t), key
    assert rows.stats["rel_err"] == pytest.approx(whole.stats["rel_err"], rel=1e-12)
    for key in ("proxy", "proxy_rtn", "sigma_in"):
        if key in whole.stats:
            assert rows.stats[key] == pytest.approx(whole.stats[key], rel=1e-10), key
    assert rows.W_hat is None


def test_only_roundings_whose_rows_round_alone():
    assert rows_round_alone(get_format("q4_K"), "ldlq") and rows_round_alone(get_format("int4-g64"), "rtn")
    assert not rows_round_alone(get_format("q4_K"), "yaqa")           # the output-side factor couples rows
    assert not rows_round_alone(get_format("fp16"), "rtn")
    W = weight(32, 64)
    with pytest.raises(BitplanError, match="does not round a row at a time"):
        quantize_rows("x", iter([W]), (32, 64), get_format("int4-g64"), "yaqa")
    with pytest.raises(BitplanError, match="whole 16-row tiles"):
        quantize_rows("x", blocks_of(W, [8, 24]), (32, 64), get_format("q4_0"), "rtn")
    with pytest.raises(BitplanError, match="held 16 of 32 rows"):
        quantize_rows("x", blocks_of(W, [16]), (32, 64), get_format("q4_0"), "rtn")


@pytest.mark.parametrize("emb", ["q4_0", "int4-g32"])   # int4-g32 rotates the 384-row vocabulary side
def test_apply_rounds_a_large_embedding_in_row_blocks_to_the_same_checkpoint(model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                             emb):
    folder, tied = model_dir
    formats = plan_formats(load_model(str(folder)), emb, None if tied else "q8_0", linears="q5_1")
    apply_formats(load_model(str(folder)), formats, tmp_path / "whole", rounding="rtn", progress=False)
    calls = []
    real = apply_run.quantize_rows
    monkeypatch.setattr(apply_run, "quantize_rows", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    monkeypatch.setattr(resources, "ROW_BLOCK_BYTES", 8 * 16 * 64)   # 16 rows of the 64-wide matrices per block
    apply_formats(load_model(str(folder)), formats, tmp_path / "rows", rounding="rtn", progress=False)
    assert EMB in calls and len(calls) == len(formats)   # every matrix here is larger than such a block
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("emb", ["q4_0", "higgs-p2-n64-g64"])
def test_a_tied_embedding_under_the_head_input_moment_in_row_blocks(tmp_path, tiny_tokenizer, monkeypatch, emb):
    """ldlq under the profile's E[hhᵀ] (the tied embedding's rounding): the same checkpoint a block of rows at a
    time as whole."""
    from tests.apply.test_embedding import tied_model_dir, write_moment

    folder = tied_model_dir(tmp_path, tiny_tokenizer, tie=True)
    write_moment(tmp_path / "prof", EMB, load_model(str(folder)).model.config.hidden_size)
    kw = dict(rounding="ldlq", profile_dir=tmp_path / "prof", shrink=0.0, progress=False)
    whole = apply_formats(load_model(str(folder)), {EMB: emb}, tmp_path / "whole", **kw)
    calls = []
    real = apply_run.quantize_rows
    monkeypatch.setattr(apply_run, "quantize_rows", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    monkeypatch.setattr(resources, "ROW_BLOCK_BYTES", 8 * 32 * 64)   # 32 of the 384 rows per block
    rows = apply_formats(load_model(str(folder)), {EMB: emb}, tmp_path / "rows", **kw)
    assert calls == [EMB] and rows.stats[EMB]["rounding"] == "ldlq"
    assert rows.stats[EMB]["proxy"] == pytest.approx(whole.stats[EMB]["proxy"], rel=1e-10)
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
