"""The embedding and an untied head as plan layers: tied storage counted once, scope, pins, formats a shape rules
out, the impossible-budget range, old profiles (tiny random Llama models, profiled once per module)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers import LlamaConfig, LlamaForCausalLM

from bitplan.errors import BitplanError
from bitplan.profile.run import profile_model
from bitplan.profile.schema import load_profile
from bitplan.solve import load_plan, solve
from tests.profile.helpers import token_ids

VOCAB, HIDDEN, FFN = 128, 64, 256   # down_proj reads 256 columns: the one input a K-type (256 per block) fits
FORMATS = "q4_K,q8_0,int4-g32,fp16"
SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m"


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():   # the same values either way: only the sharing differs
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    out = {}
    for name, is_tied in (("untied", False), ("tied", True)):
        folder = tmp_path_factory.mktemp(name)
        profile_model(tiny(is_tied), token_ids(4, 16), out_dir=folder, formats=FORMATS, noise_samples=1,
                      judge_samples=0, progress=False)
        out[name] = folder
    return out


def q8_0_bits(m: int, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    return m * n // block * size * 8


def outer(plan):
    return {lp.name: lp for lp in plan.layers if lp.outer}


def test_records_and_the_tied_matrix_counted_once(profiles):
    untied, tied = load_profile(profiles["untied"]), load_profile(profiles["tied"])
    assert [(r.name, r.kind, r.block, r.ties) for r in untied.outer_layers] == \
        [("model.embed_tokens", "embedding", -1, []), ("lm_head", "head", 1, [])]
    assert [(r.name, r.ties) for r in tied.outer_layers] == [("model.embed_tokens", ["lm_head"])]
    pins = [".*=q8_0"]   # every layer the same format, so both plans are fixed
    a = solve(profiles["untied"], "1MB", pins=pins, notes_to_stderr=False)
    b = solve(profiles["tied"], "1MB", pins=pins, notes_to_stderr=False)
    assert a.scope == b.scope == "all"
    head = q8_0_bits(VOCAB, HIDDEN)   # from gguf's block size and bytes, not bitplan's accounting
    assert outer(a)["lm_head"].storage_bits == outer(b)["model.embed_tokens"].storage_bits == head
    assert "lm_head" not in outer(b) and outer(b)["model.embed_tokens"].ties == ["lm_head"]
    assert a.totals["total_bits"] - b.totals["total_bits"] == head
    assert a.totals["extras_bits"] == b.totals["extras_bits"]   # norms only: no fp16 embedding or head
    # the file total is every plan layer + the norms in fp16, the norms counted from the model itself
    model = tiny(True)
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert b.totals["total_bits"] == sum(lp.storage_bits for lp in b.layers) + 16 * norms
    assert b.to_json()["layers"][-1]["ties"] == ["lm_head"]


def test_scope_and_pins(profiles):
    folder = profiles["untied"]
    blocks = solve(folder, "6bpw", notes_to_stderr=False)
    assert blocks.scope == "blocks" and {lp.format for lp in outer(blocks).values()} == {"fp16"}
    # a bpw budget covers the block linears only: the fp16 embedding and head come on top
    block_bits = sum(lp.storage_bits for lp in blocks.layers if not lp.outer)
    assert block_bits <= 6 * blocks.totals["block_weights"] < blocks.totals["layer_bits"]
    pinned = solve(folder, "6bpw", pins=["embed_tokens=q8_0"], notes_to_stderr=False)
    assert outer(pinned)["model.embed_tokens"].format == "q8_0" and outer(pinned)["lm_head"].format == "fp16"
    every = solve(folder, "6bpw", scope="all", notes_to_stderr=False)
    assert every.scope == "all" and json.loads(json.dumps(every.to_json()))["scope"] == "all"
    assert every.totals["layer_bits"] <= 6 * every.totals["planned_weights"]
    assert {lp.format for lp in outer(every).values()} != {"fp16"}
    pinned_all = solve(folder, "6bpw", scope="all", pins=["embed_tokens=int4-g32"], notes_to_stderr=False)
    assert outer(pinned_all)["model.embed_tokens"].format == "int4-g32"
    # a tie group of whole blocks: the block's linears share one format, the embedding and head are items apart
    tied_blocks = solve(folder, "6bpw", scope="all", tie="block", formats="int4-g32,q8_0,fp16",
                        notes_to_stderr=False)
    assert len({lp.format for lp in tied_blocks.layers if not lp.outer}) == 1
    assert tied_blocks.totals["layer_bits"] <= 6 * tied_blocks.totals["planned_weights"]


@pytest.mark.parametrize("budget", ["7.7bpw", "8.5bpw", "12bpw"])
def test_a_k_type_only_where_the_input_is_a_multiple_of_256(profiles, budget):
    plan = solve(profiles["untied"], budget, scope="all", formats="q4_K,q8_0,fp16", notes_to_stderr=False)
    for lp in plan.layers:
        if lp.format == "q4_K":
            assert lp.shape[1] % 256 == 0
    if budget == "7.7bpw":
        assert {lp.format for lp in plan.layers if lp.kind == "down_proj"} == {"q4_K"}   # it is in play
    prof = load_profile(profiles["untied"])
    assert all("q4_K" not in r.rel_err and "q4_K" in r.extra["inapplicable_formats"]
               for r in prof.plannable if r.shape[1] % 256)
    assert all("q4_K" in r.rel_err for r in prof.plannable if r.kind == "down_proj")
    with pytest.raises(BitplanError, match="cannot store model.embed_tokens"):
        solve(profiles["untied"], "8bpw", pins=["embed_tokens=q4_K"], notes_to_stderr=False)


def test_an_impossible_byte_budget_names_the_range_with_the_embedding(profiles):
    with pytest.raises(BitplanError) as e:
        # as many digits as the range's ends: the reserve for the file header grows with the offsets' digits
        solve(profiles["tied"], "10000B", formats="int4-g32,q8_0,fp16", notes_to_stderr=False)
    text = str(e.value)
    assert "embedding at" in text
    low = int(re.search(r"achievable [^(]*\(([0-9,]+) bytes\)", text).group(1).replace(",", ""))
    # the low end is a budget that fits, with every layer (the embedding too) in its smallest format; a byte
    # less does not
    plan = solve(profiles["tied"], f"{low}B", formats="int4-g32,q8_0,fp16", notes_to_stderr=False)
    assert {lp.format for lp in plan.layers} == {"int4-g32"}
    with pytest.raises(BitplanError, match="below what these constraints allow"):
        solve(profiles["tied"], f"{low - 1}B", formats="int4-g32,q8_0,fp16", notes_to_stderr=False)


def test_an_edited_plan_is_rechecked_with_the_embedding(profiles, tmp_path):
    folder = profiles["tied"]
    plan = solve(folder, "6bpw", scope="all", notes_to_stderr=False)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    emb = next(e for e in data["layers"] if e["name"] == "model.embed_tokens")
    emb["format"] = "q8_0"
    (tmp_path / "edited.json").write_text(json.dumps(data))
    edited = load_plan(tmp_path / "edited.json")
    assert outer(edited)["model.embed_tokens"].storage_bits == q8_0_bits(VOCAB, HIDDEN)
    assert edited.totals["layer_bits"] == sum(lp.storage_bits for lp in edited.layers)
    assert edited.scope == "all" and outer(edited)["model.embed_tokens"].ties == ["lm_head"]
    emb["format"] = "q4_K"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(BitplanError, match="q4_K cannot store"):
        load_plan(tmp_path / "bad.json")
    del data["layers"][[e["name"] for e in data["layers"]].index("model.embed_tokens")]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(BitplanError, match="no format for layer model.embed_tokens"):
        load_plan(tmp_path / "missing.json")


def test_an_old_profile_keeps_the_embedding_in_fp16_and_refuses_scope_all():
    plan = solve(SHIPPED, "93510432B", notes_to_stderr=False)
    assert plan.scope == "blocks" and not any(lp.outer for lp in plan.layers)
    emb = 49152 * 576
    assert plan.extras["tensors"][0]["bits"] == 16 * emb and plan.totals["extras_bits"] >= 16 * emb
    with pytest.raises(BitplanError, match="remake it with `bitplan profile`"):
        solve(SHIPPED, "93510432B", scope="all", notes_to_stderr=False)
