"""The profile's --device and --dtype: cpu/float32 is the profile made without them, bfloat16 weights give the
float32 coefficients within a stated tolerance, and bad values are refused in one line."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.profile import profile_model

from tests.conftest import tiny_llama as tiny_llama_with_vocab
from tests.profile.helpers import tiny_llama, token_ids

KW = dict(sketch_chunk=4, noise_samples=2, formats="int4-g32,fp16", batch_size=2, checkpoint_every=2,
          progress=False, judge_samples=0)


def hessian_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "hessians").rglob("*")) if p.is_file()}


def test_cpu_float32_is_the_profile_without_options(tiny_model_dir, tmp_path):
    """The model loaded from its folder with --device cpu --dtype float32 gives the same records (coefficients,
    α_noise, format errors) and the same factor files, byte for byte, as the same weights profiled in memory
    without either option."""
    ids = token_ids(6, 16)
    plain = profile_model(tiny_llama_with_vocab(300), ids, out_dir=tmp_path / "plain", **KW)
    chosen = profile_model(str(tiny_model_dir), ids, out_dir=tmp_path / "chosen", device="cpu", dtype="float32", **KW)
    assert chosen.model["weights_sha256"] == plain.model["weights_sha256"]
    assert chosen.to_json()["layers"] == plain.to_json()["layers"]
    assert chosen.to_json()["outer_layers"] == plain.to_json()["outer_layers"]
    assert hessian_bytes(tmp_path / "chosen") == hessian_bytes(tmp_path / "plain")
    assert chosen.settings["fingerprint"] == plain.settings["fingerprint"]   # no dtype enters a float32 one
    assert (chosen.settings["device"], chosen.settings["dtype"]) == ("cpu", "float32")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_bfloat16_coefficients_close_to_float32(tmp_path):
    """bf16 weights on the CPU against the float32 profile of the same bf16-rounded weights, which isolates the
    arithmetic (the bf16 forward and backward) from the weights' rounding.

    Tolerances: bf16 activations and gradients carry 2⁻⁹ ≈ 2e-3 relative rounding; the factor statistics are
    float32 sums of upcast copies over many tokens, where those roundings mostly average out (measured here: at
    most 9e-4 on α_hessian, the traces and the YAQA forecasts), so 3e-3 (one and a half rounding units). The
    format errors see the same weight values: equal exactly. α_noise reruns the blocks in float32 from the bf16
    forward's own block inputs: within 5 % (measured ≤ 2.2 %) for the layers whose α_noise is at least 1 % of the
    largest; below that, ΔKL sits at float32's own floor on this tiny model."""
    ids = token_ids(8, 32)
    model = tiny_llama().to(torch.bfloat16)
    original = {n: p.clone() for n, p in model.named_parameters()}
    bf = profile_model(model, ids, out_dir=tmp_path / "bf16", **KW)
    ref = profile_model(tiny_llama().to(torch.bfloat16).to(torch.float32), ids, out_dir=tmp_path / "f32", **KW)
    # the model is left as it was: bf16, unperturbed (the noise reruns' float32 copies are put back)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert bf.model["weights_sha256"] == ref.model["weights_sha256"]   # bf16 hashes as its float32 upcast
    assert bf.settings["fingerprint"]["model_dtype"] == "bfloat16" and "model_dtype" not in ref.settings["fingerprint"]
    assert bf.settings["dtype"] == "bfloat16"
    top = max(r.alpha_noise for r in ref.layers + ref.outer_layers)
    for x, y in zip(bf.layers, ref.layers):
        for key in ("alpha_hessian", "trace_h_in", "trace_h_out", "alpha_yaqa", "alpha_yaqa_heldout"):
            assert rel(getattr(x, key), getattr(y, key)) < 3e-3, (x.name, key)
        assert x.rel_err == y.rel_err
    for x, y in zip(bf.outer_layers, ref.outer_layers):
        for key in ("alpha_hessian", "trace_h_in", "trace_h_out"):
            assert rel(getattr(x, key), getattr(y, key)) < 3e-3, (x.name, key)
    for x, y in zip(bf.layers + bf.outer_layers, ref.layers + ref.outer_layers):
        if y.alpha_noise >= 0.01 * top:
            assert rel(x.alpha_noise, y.alpha_noise) < 0.05, x.name
    # the two are different profiles: one does not stand in for the other in an existing folder
    with pytest.raises(BitplanError, match="model_dtype"):
        profile_model(tiny_llama().to(torch.bfloat16), ids, out_dir=tmp_path / "f32", **KW)


def test_in_memory_model_must_match_the_options(tmp_path):
    with pytest.raises(BitplanError, match="holds torch.float32 weights, not torch.bfloat16"):
        profile_model(tiny_llama(), token_ids(4, 8), out_dir=tmp_path / "p", dtype="bfloat16", **KW)


@pytest.mark.parametrize("option", [["--device", "tpu"], ["--device", "cuda:x"], ["--dtype", "int8"]])
def test_bad_device_or_dtype_is_one_line(option, tmp_path, monkeypatch, capsys):
    """Refused before any model loads (the model does not even exist), in one line, exit 2."""
    monkeypatch.setattr(sys, "argv", ["bitplan", "profile", str(tmp_path / "none"), "--out", str(tmp_path / "p"),
                                      *option])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert option[0] in err and option[1] in err
