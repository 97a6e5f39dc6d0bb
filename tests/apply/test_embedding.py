"""The token embedding and the output head in a checkpoint: rounded by apply, stored once, loaded exactly."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from bitplan.apply import apply_formats, load_quantized, quantize_layer, simulate
from bitplan.apply.embedding import QuantizedEmbedding, TiedQuantizedHead
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.evaluate import evaluate
from bitplan.formats import get_format
from bitplan.models import find_linears, load_model

from tests.conftest import tiny_llama

VOCAB = 384   # 12 · 32: the vocabulary side has a Hadamard rotation (the tokenizer's 300 ids fit in it)
EMB, HEAD = "model.embed_tokens", "lm_head"


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path, tiny_tokenizer):
    """A tiny random Llama with a 384-token vocabulary, its head tied to the embedding or not."""
    return tied_model_dir(tmp_path, tiny_tokenizer, tie=request.param), request.param


def plan_formats(lm, emb: str, head: str | None, linears: str = "int4-g32") -> dict[str, str]:
    formats = {info.name: linears for info in find_linears(lm.model)}
    formats[EMB] = emb
    if head is not None:
        formats[HEAD] = head
    return formats


def data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file size less the 8-byte length and the JSON header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def reference_w_hat(model_dir, formats):
    """Each matrix rounded on its own by quantize_layer (RTN), from a fresh load of the original model."""
    ref = load_model(str(model_dir))
    return ref, {n: quantize_layer(n, ref.model.get_submodule(n).weight, get_format(f), "rtn").W_hat
                 for n, f in formats.items()}


@pytest.mark.parametrize("fmt", ["int4-g32", "higgs-p2-n64-g64", "q8_0", "q4_0"])
def test_quantized_embedding_round_trips_exactly(model_dir, tmp_path, fmt):
    """Rotated formats (int, grid) dequantize the whole matrix; ggml's block types look up single rows."""
    folder, tied = model_dir
    lm = load_model(str(folder))
    formats = plan_formats(lm, fmt, None if tied else "int3-g32")
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    ref, W_hat = reference_w_hat(folder, formats)
    simulate(ref.model, W_hat)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref.model(ids).logits.double()
        for cache in (True, False):
            loaded = load_quantized(tmp_path / "q", cache=cache).model
            emb, head = loaded.get_submodule(EMB), loaded.get_submodule(HEAD)
            assert isinstance(emb, QuantizedEmbedding) and emb.format.name == fmt
            assert isinstance(head, TiedQuantizedHead if tied else QuantizedLinear)
            assert torch.equal(emb.dequantized_weight(), W_hat[EMB])      # bit for bit apply's W_hat
            assert torch.equal(emb(ids), W_hat[EMB][ids])
            # uncached and unrotated, a lookup dequantizes its rows alone, never the whole matrix
            assert (emb._weight is None) == (not cache and not emb.format.rotated)
            if not tied:
                assert torch.equal(head.effective_weight(), W_hat[HEAD])
            got = loaded(ids).logits.double()
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), cache
            # the tied head computes with the dequantized embedding, not with an fp16 copy of the original
            if tied:
                h = loaded.model(ids).last_hidden_state.double()
                assert torch.allclose(got, h @ W_hat[EMB].double().T, rtol=0, atol=1e-5 * got.abs().max())


def test_the_file_stores_the_embedding_once(model_dir, tmp_path):
    folder, tied = model_dir
    lm = load_model(str(folder))
    formats = plan_formats(lm, "int4-g32", None if tied else "int4-g32")
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{EMB}.weight" not in keys and f"{HEAD}.weight" not in keys
    assert {f"{EMB}.codes", f"{EMB}.scale", f"{EMB}.zero", f"{EMB}.rotation_seeds"} <= keys
    assert any(k.startswith(f"{HEAD}.") for k in keys) == (not tied)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["modules"][EMB] == "int4-g32" and qc["tied_head"] is tied
    assert qc["vocab_modules"] == ({EMB: "embedding"} if tied else {EMB: "embedding", HEAD: "head"})
    assert qc["layers"][EMB]["rounding"] == "rtn"


def test_the_file_shrinks_by_the_embedding_s_saving(model_dir, tmp_path):
    """Against the same plan with the embedding (and head) kept fp16, the tensor data shrinks by exactly the fp16
    bytes less the formats' storage_bits (and a grid's codebook, stored once)."""
    folder, tied = model_dir
    lm = load_model(str(folder))
    base = plan_formats(lm, "fp16", None if tied else "fp16")
    quant = plan_formats(lm, "q4_0" if tied else "int4-g32", None if tied else "higgs-p2-n64-g64")
    apply_formats(lm, base, tmp_path / "a", rounding="rtn", progress=False)
    apply_formats(lm, quant, tmp_path / "b", rounding="rtn", progress=False)
    matrices = [EMB] if tied else [EMB, HEAD]
    hidden = lm.model.config.hidden_size
    saved = sum(VOCAB * hidden * 16 - get_format(quant[n]).storage_bits(VOCAB, hidden) for n in matrices)
    saved -= sum(get_format(f).codebook_bits for f in {quant[n] for n in matrices})   # a grid's table, once
    assert saved % 8 == 0 and saved > 0
    assert data_bytes(tmp_path / "a" / "model.safetensors") - data_bytes(tmp_path / "b" / "model.safetensors") \
        == saved // 8
    # planned fp16, the embedding stays the model's own fp16 tensor (a tied head shares it)
    assert not isinstance(load_quantized(tmp_path / "a").model.get_submodule(EMB), QuantizedEmbedding)


def test_embedding_is_rounded_to_nearest_and_an_untied_head_without_factors_too(tmp_path, tiny_tokenizer):
    """A plan for LDLQ: the embedding (a lookup table) and a head the profile has no factors for are rounded to
    nearest, and the checkpoint says so."""
    folder = tmp_path / "tiny"
    tiny_llama(VOCAB).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    formats = {EMB: "int4-g32", HEAD: "int4-g32"}
    result = apply_formats(lm, formats, tmp_path / "q", rounding="ldlq", progress=False)
    assert result.stats[EMB]["rounding"] == "rtn" and "lookup table" in result.stats[EMB]["rounding_note"]
    assert result.stats[HEAD]["rounding"] == "rtn" and "no factors" in result.stats[HEAD]["rounding_note"]
    _, W_hat = reference_w_hat(folder, formats)
    loaded = load_quantized(tmp_path / "q").model
    assert torch.equal(loaded.get_submodule(EMB).dequantized_weight(), W_hat[EMB])
    assert torch.equal(loaded.get_submodule(HEAD).effective_weight(), W_hat[HEAD])


@pytest.mark.parametrize("model_dir", [True], indirect=True, ids=["tied"])
def test_a_tied_head_has_no_format_of_its_own(model_dir, tmp_path):
    folder, _ = model_dir
    lm = load_model(str(folder))
    with pytest.raises(BitplanError, match="tied to the embedding"):
        apply_formats(lm, {HEAD: "int4-g32"}, tmp_path / "q", rounding="rtn", progress=False)


def test_eval_runs_a_checkpoint_with_a_quantized_embedding(model_dir, tmp_path, tiny_text):
    """`bitplan eval --candidate CHECKPOINT`: the KL of the checkpoint equals that of the simulated model."""
    folder, tied = model_dir
    lm = load_model(str(folder))
    formats = plan_formats(lm, "int4-g32", None if tied else "int4-g32")
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    ref, W_hat = reference_w_hat(folder, formats)
    simulate(ref.model, W_hat)
    kw = dict(data=str(tiny_text), windows=2, seqlen=16, cache=False, progress=False)
    got = evaluate(str(folder), str(tmp_path / "q"), **kw)
    want = evaluate(str(folder), ref, **kw)
    assert got.kl_mean > 0
    assert got.kl_mean == pytest.approx(want.kl_mean, rel=1e-4)
    # with less memory than either model takes: the reference offloaded to disk, the checkpoint's layers and
    # embedding dequantized at every call instead of kept; the same figures to float rounding
    tight = evaluate(str(folder), str(tmp_path / "q"), **kw, max_memory_gb=1e-6)
    assert not got.memory_notes and len(tight.memory_notes) == 2
    assert "offloads the others to disk" in tight.memory_notes[0]
    assert "dequantized again at every call" in tight.memory_notes[1]
    assert tight.kl_mean == pytest.approx(got.kl_mean, rel=1e-5) and tight.ppl_ratio == pytest.approx(got.ppl_ratio)


def test_a_solved_plan_with_the_embedding_and_head_becomes_a_checkpoint(tmp_path, tiny_tokenizer):
    """profile → solve (whole model, the embedding pinned to q4_0) → apply: the planned embedding and head are
    stored in exactly their planned bits, the untied head rounded with one-sided LDLQ under the input moment the
    profile kept for it, the untied embedding to nearest."""
    from safetensors.torch import load_file

    from bitplan.apply import apply_plan
    from bitplan.profile import profile_model
    from bitplan.solve import solve

    folder = tmp_path / "tiny"
    tiny_llama(VOCAB).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    profile_model(lm, windows, out_dir=tmp_path / "prof", noise_samples=0, judge_samples=0, progress=False,
                  formats=["int3-g32", "int4-g32", "q4_0", "q8_0", "fp16"])
    plan = solve(tmp_path / "prof", "4.5bpw", scope="all", pins=[f"{EMB}=q4_0"], notes_to_stderr=False)
    planned = {lp.name: lp for lp in plan.layers if lp.kind in ("embedding", "head")}
    assert set(planned) == {EMB, HEAD} and planned[EMB].format == "q4_0" and planned[HEAD].format != "fp16"
    plan.save(tmp_path / "plan.json")
    result = apply_plan(tmp_path / "plan.json", tmp_path / "q", model=lm, rounding="yaqa", progress=False)
    assert result.stats[HEAD]["rounding"] == "ldlq" and result.stats[EMB]["rounding"] == "rtn"
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    for name, lp in planned.items():
        stored = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k.startswith(name + "."))
        assert stored == lp.storage_bits, name
    loaded = load_quantized(tmp_path / "q").model
    assert isinstance(loaded.get_submodule(EMB), QuantizedEmbedding)
    assert isinstance(loaded.get_submodule(HEAD), QuantizedLinear)
    assert loaded.get_submodule(HEAD).format.name == planned[HEAD].format
    # the CLI on a plan keeping them fp16 (scope blocks): reported as the fp16 tensors the file keeps
    from typer.testing import CliRunner

    from bitplan.cli import app

    kept = solve(tmp_path / "prof", "4.5bpw", scope="blocks", notes_to_stderr=False)
    assert {lp.format for lp in kept.layers if lp.kind in ("embedding", "head")} == {"fp16"}
    kept.save(tmp_path / "kept.json")
    run = CliRunner().invoke(app, ["apply", str(tmp_path / "kept.json"), "-o", str(tmp_path / "k"), "--model",
                                   str(folder), "--rounding", "rtn"])
    assert run.exit_code == 0, run.output
    qc = json.loads((tmp_path / "k" / "config.json").read_text())["quantization_config"]
    assert EMB not in qc["modules"] and qc["layers"][EMB]["format"] == "fp16"


@pytest.mark.parametrize("rounding", ["ldlq", "yaqa"])
def test_an_untied_head_with_factors_gets_the_plan_s_rounding(tmp_path, tiny_tokenizer, rounding):
    """When the profile holds the head's factors, the head is rounded by the plan's rounding with them: its W_hat
    equals quantize_layer's with those factors (and differs from round-to-nearest's); the embedding stays RTN."""
    from bitplan.profile.factors import FactorSums
    from bitplan.profile.hessians import HALVES, factors_path, load_factors, save_half_factors

    from tests.apply.test_ldlq import spd

    folder = tmp_path / "tiny"
    tiny_llama(VOCAB).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    hidden = lm.model.config.hidden_size
    for i, half in enumerate(HALVES):
        sums = FactorSums(spd(VOCAB, 10 + i), spd(hidden, 20 + i), spd(hidden, 30 + i), 1.0, 4, 64, 1.0)
        save_half_factors(factors_path(tmp_path / "prof", HEAD, half), HEAD, half, sums, sketch_chunk=1)
    formats = {EMB: "int4-g32", HEAD: "int4-g32"}
    result = apply_formats(lm, formats, tmp_path / "q", rounding=rounding, profile_dir=tmp_path / "prof",
                           shrink=0.0, progress=False)
    assert result.stats[HEAD]["rounding"] == rounding and result.stats[HEAD]["rounding_note"] is None
    assert result.stats[EMB]["rounding"] == "rtn"
    f = load_factors(tmp_path / "prof", HEAD)
    W = load_model(str(folder)).model.get_submodule(HEAD).weight
    fmt = get_format("int4-g32")
    expected = quantize_layer(HEAD, W, fmt, rounding, H_in=f.xtx if rounding == "ldlq" else f.h_in,
                              H_out=f.h_out if rounding == "yaqa" else None).W_hat
    got = load_quantized(tmp_path / "q").model.get_submodule(HEAD).effective_weight()
    assert torch.equal(got, expected)
    assert not torch.equal(got, quantize_layer(HEAD, W, fmt, "rtn").W_hat)


@pytest.mark.architectures
@pytest.mark.parametrize("family", ["qwen2-qkv-bias-tied", "gemma3-scalar-buffer-scaled-embedding-tied-qk-norm-extra-"
                                    "norms-sliding-window", "gpt_neox-fused-query_key_value-biases-parallel-residual"])
def test_other_families_embeddings_round_trip(family, tmp_path, tiny_tokenizer):
    """Other module names (gpt_neox.embed_in), a tied head with biases elsewhere, Gemma's scaled embedding (the
    scale kept as a buffer): the loaded checkpoint's logits equal the simulated model's."""
    from tests.architectures.test_families import FAMILIES, build
    from bitplan.apply.embedding import vocab_matrices

    model_type, extra, _, tied = FAMILIES[family]
    folder = tmp_path / "m"
    build(model_type, extra, VOCAB).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    formats = {name: "q4_0" for name in vocab_matrices(lm.model)}
    assert len(formats) == (1 if tied else 2)
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    ref, W_hat = reference_w_hat(folder, formats)
    simulate(ref.model, W_hat)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = load_quantized(tmp_path / "q").model(ids).logits.double(), ref.model(ids).logits.double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def tied_model_dir(tmp_path, tiny_tokenizer, tie: bool = True):
    model = tiny_llama(VOCAB)
    if tie:
        from transformers import LlamaForCausalLM

        model.config.tie_word_embeddings = True
        tied = LlamaForCausalLM(model.config).eval()
        tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
        tied.tie_weights()
        model = tied
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_moment(prof, name: str, hidden: int) -> torch.Tensor:
    """A one-sided factor file per half (Σhhᵀ alone, as the profile's outer phase writes it); returns the sum."""
    from bitplan.profile.hessians import HALVES, factors_path, save_input_moment

    from tests.apply.test_ldlq import spd

    total = torch.zeros(hidden, hidden, dtype=torch.float64)
    for i, half in enumerate(HALVES):
        h = spd(hidden, 40 + i)
        save_input_moment(factors_path(prof, name, half), name, half, h, tokens=64, samples=4)
        total += ((h + h.T) / 2).float().double()   # stored float32
    return total


@pytest.mark.parametrize("rounding", ["ldlq", "yaqa", "rtn"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_head_input_moment_rounds_the_tied_embedding_and_an_untied_head_with_ldlq(tmp_path, tiny_tokenizer,
                                                                                      rounding, tie):
    """With the profile's E[hhᵀ] (tied: under the embedding's name; untied: the head's), a yaqa or ldlq plan
    rounds that matrix with one-sided LDLQ under it: bit for bit quantize_layer(..., "ldlq", H_in=Σhhᵀ), not
    round-to-nearest's. rtn stays rtn; an untied embedding stays rtn."""
    folder = tied_model_dir(tmp_path, tiny_tokenizer, tie)
    lm = load_model(str(folder))
    hidden = lm.model.config.hidden_size
    owner = EMB if tie else HEAD
    H = write_moment(tmp_path / "prof", owner, hidden)
    formats = {EMB: "int4-g32"} if tie else {EMB: "int4-g32", HEAD: "q4_0"}
    result = apply_formats(lm, formats, tmp_path / "q", rounding=rounding, profile_dir=tmp_path / "prof",
                           shrink=0.0, progress=False)
    fmt = get_format(formats[owner])
    W = load_model(str(folder)).model.get_submodule(owner).weight
    rtn = quantize_layer(owner, W, fmt, "rtn").W_hat
    loaded = load_quantized(tmp_path / "q").model
    got = (loaded.get_submodule(EMB).dequantized_weight() if tie
           else loaded.get_submodule(HEAD).effective_weight())
    st = result.stats[owner]
    if rounding == "rtn":
        assert st["rounding"] == "rtn" and "h_in" not in st and torch.equal(got, rtn)
        return
    assert st["rounding"] == "ldlq" and st["rounding_note"] is None and "E[hhᵀ]" in st["h_in"]
    assert torch.equal(got, quantize_layer(owner, W, fmt, "ldlq", H_in=H).W_hat)
    assert not torch.equal(got, rtn)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["layers"][owner]["rounding"] == "ldlq"
    if not tie:   # an untied embedding: no factor of its own, to nearest with the note
        assert result.stats[EMB]["rounding"] == "rtn" and "lookup table" in result.stats[EMB]["rounding_note"]
        _, W_hat = reference_w_hat(folder, {EMB: "int4-g32"})
        assert torch.equal(loaded.get_submodule(EMB).dequantized_weight(), W_hat[EMB])


def test_an_untied_embedding_stays_rtn_even_beside_a_moment_file(tmp_path, tiny_tokenizer):
    """A moment file under an untied embedding's name (never written by the profile) does not make it LDLQ."""
    folder = tied_model_dir(tmp_path, tiny_tokenizer, tie=False)
    lm = load_model(str(folder))
    write_moment(tmp_path / "prof", EMB, lm.model.config.hidden_size)
    result = apply_formats(lm, {EMB: "int4-g32"}, tmp_path / "q", rounding="ldlq", profile_dir=tmp_path / "prof",
                           progress=False)
    assert result.stats[EMB]["rounding"] == "rtn"
    _, W_hat = reference_w_hat(folder, {EMB: "int4-g32"})
    assert torch.equal(load_quantized(tmp_path / "q").model.get_submodule(EMB).dequantized_weight(), W_hat[EMB])
