"""bitplan eval with --device and --dtype: bfloat16 weights against float32, and bad values refused in one line."""
from __future__ import annotations

import sys

import pytest
import torch

from bitplan.cli import main
from bitplan.evaluate import evaluate
from bitplan.loading import open_model

from tests.test_evaluate import noisy_copy_dir

# bf16 rounds every weight and activation to 2⁻⁹ relative, independently in the reference and the candidate, which
# adds a small KL of its own: measured on these tiny models, +0.2 % (noisy copy) and +3.5 % (4-bit checkpoint) on 3
# windows of 32 tokens, +1.7 % for the checkpoint on 12 windows. 6 % bounds that with room for another BLAS.
BF16_KL_REL = 0.06
KW = dict(windows=3, seqlen=32, progress=False, cache=False, device="cpu")


def both(reference, candidate, text):
    return tuple(evaluate(str(reference), str(candidate), str(text), dtype=d, **KW) for d in ("float32", "bfloat16"))


def test_bfloat16_kl_close_to_float32(tiny_model_dir, tiny_text, tmp_path):
    """A noisy copy against its original, both models held in bf16 (weights rounded too: the figure a user of
    --dtype bfloat16 gets), against the same in float32."""
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    f32, bf16 = both(tiny_model_dir, noisy, tiny_text)
    assert f32.tokens == bf16.tokens == 3 * 31
    assert bf16.kl_mean == pytest.approx(f32.kl_mean, rel=BF16_KL_REL)
    assert bf16.kl_mean != f32.kl_mean   # the bf16 models did run
    ref = open_model(str(tiny_model_dir), "bfloat16", "cpu")
    assert {p.dtype for p in ref.model.parameters()} == {torch.bfloat16}


def test_bfloat16_checkpoint_candidate(tiny_model_dir, tiny_text, tmp_path):
    """A bitplan checkpoint (its embedding quantized too) opened in bf16: the packed tensors keep their dtypes,
    every other weight is bf16, and its KL against the bf16 reference is the float32 KL within BF16_KL_REL."""
    from bitplan.apply import apply_formats
    from bitplan.apply.module import QuantizedLinear
    from bitplan.models import find_linears, load_model

    lm = load_model(str(tiny_model_dir))
    formats = {i.name: "int4-g32" for i in find_linears(lm.model)} | {"model.embed_tokens": "int4-g32"}
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False, device="cpu", dtype="float32")
    stored = open_model(str(tmp_path / "q"))
    cand = open_model(str(tmp_path / "q"), "bfloat16", "cpu")
    name = next(iter(formats))
    q, q32 = cand.model.get_submodule(name), stored.model.get_submodule(name)
    assert isinstance(q, QuantizedLinear)
    for key in q._packed_keys:
        assert torch.equal(getattr(q, key), getattr(q32, key)), key   # the packed bytes untouched
    assert {p.dtype for p in cand.model.parameters()} == {torch.bfloat16}
    f32, bf16 = both(tiny_model_dir, tmp_path / "q", tiny_text)
    assert bf16.kl_mean == pytest.approx(f32.kl_mean, rel=BF16_KL_REL) and bf16.kl_mean != f32.kl_mean


@pytest.mark.parametrize("option", [["--device", "tpu"], ["--device", "cuda:x"], ["--dtype", "int8"]])
def test_bad_device_or_dtype_is_one_line(option, tmp_path, monkeypatch, capsys):
    """Refused before any model loads (the reference does not even exist), in one line, exit 2."""
    monkeypatch.setattr(sys, "argv", ["bitplan", "eval", "-r", str(tmp_path / "none"), "-c", str(tmp_path / "none"),
                                      *option])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert option[0] in err and option[1] in err
