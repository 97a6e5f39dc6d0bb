"""Packed checkpoints: layer round trip, loading back, equality with the simulated model, damage detection."""
from __future__ import annotations

import json

import pytest
import torch

from bitplan.apply import apply_formats, load_quantized, quantize_layer, simulate
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.formats import get_format
from bitplan.loading import open_model
from bitplan.models import find_linears, load_model

from tests.apply.test_ldlq import spd


@pytest.mark.parametrize("fmt_name", ["int4-g32", "higgs-p2-n256-g64", "higgs-p1-n8-g64", "fp16"])
@pytest.mark.parametrize("rounding", ["rtn", "yaqa"])
def test_layer_round_trip(fmt_name, rounding):
    """The packed tensors, run through QuantizedLinear, compute x·Ŵᵀ with Ŵ the returned dequantized weight."""
    m, n = 48, 64
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    res = quantize_layer("blocks.0.proj", W, get_format(fmt_name), rounding, spd(n, 1), spd(m, 2))
    assert 0 < res.stats["rel_err"] < 0.2
    layer = QuantizedLinear(n, m, fmt_name, res.tensors)
    x = torch.randn(5, n)
    assert torch.allclose(layer(x), x @ res.W_hat.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.effective_weight(), res.W_hat, atol=1e-6)
    if rounding == "yaqa" and fmt_name != "fp16":
        assert res.stats["proxy"] < res.stats["proxy_rtn"]


def test_nan_weights_are_an_error():
    W = torch.randn(16, 32)
    W[3, 4] = float("nan")
    with pytest.raises(BitplanError, match="NaN"):
        quantize_layer("x", W, get_format("int4-g32"), "rtn")


def test_yaqa_without_factors_is_an_error():
    with pytest.raises(BitplanError, match="Hessian factors"):
        quantize_layer("x", torch.randn(16, 32), get_format("int4-g32"), "yaqa")


def mixed_formats(model_dir):
    lm = load_model(str(model_dir))
    names = [l.name for l in find_linears(lm.model)]
    choices = ["int4-g32", "higgs-p2-n64-g64", "fp16", "int3-g64", "higgs-p1-n16-g64"]
    return lm, {name: choices[i % len(choices)] for i, name in enumerate(names)}


def test_checkpoint_equals_simulated_model(tiny_model_dir, tmp_path):
    lm, formats = mixed_formats(tiny_model_dir)
    out = tmp_path / "q"
    result = apply_formats(lm, formats, out, rounding="rtn", progress=False)
    assert set(result.formats) == set(formats)
    # The simulated model: the original with each layer's dequantized weight (from rounding, in float64, not
    # from the checkpoint), other tensors in their stored precision.
    reference = load_model(str(tiny_model_dir))
    W_hat = {name: quantize_layer(name, lm.model.get_submodule(name).weight, get_format(f), "rtn").W_hat
             for name, f in formats.items()}
    simulate(reference.model, W_hat)
    ids = torch.randint(0, len(lm.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        b = reference.model(ids).logits
        # cache=True: one dense matmul with the unrotated weight; cache=False: rotate x, packed weights, rotate back
        for cache in (True, False):
            loaded = load_quantized(out, cache=cache)
            assert sum(isinstance(m, QuantizedLinear) for m in loaded.model.modules()) == len(formats)
            a = loaded.model(ids).logits
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), cache
    # open_model dispatches on the checkpoint's quant_method; load_model takes plain models only.
    again = open_model(str(out))
    assert isinstance(again.model.get_submodule(next(iter(formats))), QuantizedLinear)
    with pytest.raises(BitplanError, match="is a bitplan checkpoint"):
        load_model(str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitplan" and qc["modules"] == formats


def test_damaged_checkpoints_are_clear_errors(tiny_model_dir, tmp_path):
    lm, formats = mixed_formats(tiny_model_dir)
    out = tmp_path / "q"
    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BitplanError, match="truncated or corrupted"):
        load_quantized(out)
    weights.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(BitplanError, match="truncated or corrupted"):
        load_quantized(out)
    weights.unlink()
    with pytest.raises(BitplanError, match="missing"):
        load_quantized(out)
    with pytest.raises(BitplanError, match="no checkpoint"):
        load_quantized(tmp_path / "nowhere")


def test_unknown_layer_or_format(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    with pytest.raises(BitplanError, match="does not have"):
        apply_formats(lm, {"model.layers.9.mlp.up_proj": "int4-g32"}, tmp_path / "a", rounding="rtn", progress=False)
    name = find_linears(lm.model)[0].name
    with pytest.raises(BitplanError):
        apply_formats(lm, {name: "int9-g7"}, tmp_path / "b", rounding="rtn", progress=False)


def test_refuses_to_overwrite_a_foreign_folder(tiny_model_dir, tmp_path):
    lm, formats = mixed_formats(tiny_model_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BitplanError, match="refusing to overwrite"):
        apply_formats(lm, formats, precious, rounding="rtn", progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_resume_reuses_finished_layers(tiny_model_dir, tmp_path, monkeypatch):
    """A run killed after some layers resumes from their parts and writes the same checkpoint."""
    import bitplan.apply.run as run

    lm, formats = mixed_formats(tiny_model_dir)
    calls = []
    real = run.quantize_layer

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "quantize_layer", dies_after_three)
    with pytest.raises(KeyboardInterrupt):  # one worker: the kill lands after exactly three layers
        apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False, workers=1)
    assert len(list(run.job_dir(tmp_path / "q").glob("*.safetensors"))) == 3
    redone = []
    monkeypatch.setattr(run, "quantize_layer", lambda *a, **k: redone.append(a[0]) or real(*a, **k))
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    assert set(redone) == set(formats) - set(calls)
    monkeypatch.setattr(run, "quantize_layer", real)
    apply_formats(lm, formats, tmp_path / "fresh", rounding="rtn", progress=False)
    a = (tmp_path / "q" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "fresh" / "model.safetensors").read_bytes()


def test_a_checkpoint_without_its_recorded_hash_is_refused(tiny_model_dir, tmp_path):
    """A damaged file must not load silently because its sha256 entry was removed from config.json."""
    lm, formats = mixed_formats(tiny_model_dir)
    out = tmp_path / "q"
    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["files"]
    (out / "config.json").write_text(json.dumps(config))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(8))   # a damaged tail, which safetensors itself does not notice
    with pytest.raises(BitplanError, match="records no sha256"):
        load_quantized(out)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                                                'on device" })')], ids=["oserror", "safetensors"])
def test_a_full_disk_is_one_clear_line_and_replaces_nothing(tiny_model_dir, tmp_path, monkeypatch, error):
    """Disk full while writing the checkpoint (or a layer's part file): a BitplanError naming the cause, the folder
    as it was, no temporaries left beside it."""
    import bitplan.apply.checkpoint as checkpoint

    lm, formats = mixed_formats(tiny_model_dir)
    out = tmp_path / "q"
    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(BitplanError, match="No space left on device.*run the same command again"):
        apply_formats(lm, formats, out, rounding="rtn", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.") and p.suffix != ".job") == []


def test_atomic_writes_turn_a_refused_write_into_one_line(tmp_path):
    from bitplan.io import atomic_path

    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(BitplanError, match="No space left on device"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(ValueError):           # any other error passes through as it is
        with atomic_path(target):
            raise ValueError("not a write failure")
