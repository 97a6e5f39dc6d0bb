"""The resource plan (bitplan.resources): its arithmetic against hand counts, the real models' own parameters and
matmul FLOPs, the files a profile writes; choose_factor_groups against a brute force; the dry-run CLI."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitplan.resources import (BASE_HOST_BYTES, GIB, RUNTIME_HOST_BYTES, Available, ModelShape, ProfileSettings, check,
                               choose_factor_groups, factor_sum_bytes, profile_plan)

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"

# A tiny config worked out by hand: hidden 8, intermediate 16, 2 blocks, 2 heads of 4 (q 8), 1 kv head (k, v 4),
# vocab 32, tied. Per block: q 8×8 = 64, k 4×8 = 32, v 32, o 8×8 = 64, gate 16×8 = 128, up 128, down 8×16 = 128
# → 576 weights + 2 norms of 8 = 592. Model: 2 × 592 + embedding 32 × 8 (tied: once) + final norm 8 = 1448.
TINY = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 32,
        "tie_word_embeddings": True}
# float64 sums of one half, 8·(m² + 2n²) bytes per layer: q 8·(64 + 128) = 1536, k 8·(16 + 128) = 1152, v 1152,
# o 1536, gate 8·(256 + 128) = 3072, up 3072, down 8·(64 + 512) = 4608 → 16128 per block, 32256 for both.
TINY_SUMS = 32256
# hessians/: both halves in float32 (2 × 32256 / 2) + the head input's moment 8×8 float32 per half (2 × 256);
# the judge's half keeps h_out and h_in only, 4·(m² + n²): 512 + 320 + 320 + 512 + 1280 + 1280 + 1280 = 5504/block.
TINY_DISK = 32256 + 512
TINY_JUDGE_DISK = 2 * 5504


def load(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_tiny_config_by_hand():
    shape = ModelShape.from_config(TINY)
    assert [(x.kind, x.out_features, x.in_features) for x in shape.block_linears()] == [
        ("q_proj", 8, 8), ("k_proj", 4, 8), ("v_proj", 4, 8), ("o_proj", 8, 8), ("gate_proj", 16, 8),
        ("up_proj", 16, 8), ("down_proj", 8, 16)]
    assert shape.params == 1448
    assert factor_sum_bytes(shape.linears()) == TINY_SUMS
    s = ProfileSettings(samples=4, seqlen=4, judge_samples=0, outer_windows=2)
    plan = profile_plan(TINY, s)
    assert plan.disk_bytes == TINY_DISK
    assert profile_plan(TINY, replace(s, judge_samples=2)).disk_bytes == TINY_DISK + TINY_JUDGE_DISK
    # the load phase holds the process and the weights: float32 and bf16
    assert plan.phase("load").host_bytes == BASE_HOST_BYTES + 1448 * 4
    assert profile_plan(TINY, replace(s, dtype_bytes=2)).phase("load").host_bytes == BASE_HOST_BYTES + 1448 * 2
    # G = 2 splits the 14 layers 7/7 (one block each): each pass keeps one block's sums, 16128 bytes
    two = profile_plan(TINY, replace(s, factor_groups=2))
    assert plan.phase("factors").host_bytes - two.phase("factors").host_bytes == TINY_SUMS - 16128
    assert (plan.passes, two.passes) == (2, 3)   # the groups' passes and the outer phase's
    # the judge's float64 sums keep h_out and h_in, 8·(m² + n²) = 2 × 5504 per block: all layers, or one block
    judged = replace(s, judge_samples=2)
    one, halves = profile_plan(TINY, judged), profile_plan(TINY, replace(judged, factor_groups=2))
    assert one.phase("judge").host_bytes - halves.phase("judge").host_bytes == 2 * 5504
    assert (one.passes, halves.passes) == (3, 5)   # the judge's windows pass once per group too
    # two processes: rank 0 owns layers 0, 2, 4, … (round-robin): q, v, gate, down of block 0 and k, o, up of 1
    rank0 = 1536 + 1152 + 3072 + 4608 + 1152 + 1536 + 3072
    assert plan.phase("factors").host_bytes - profile_plan(TINY, replace(s, processes=2)).phase(
        "factors").host_bytes == TINY_SUMS - rank0


def test_llama_8b_and_70b_counts():
    """Parameter counts and float64 factor bytes from the published shapes, counted here matrix by matrix."""
    def params(h, i, layers, heads, kv, vocab, tied, hd=128):
        attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
        return layers * (attn + 3 * h * i + 2 * h) + vocab * h * (1 if tied else 2) + h

    p8 = params(4096, 14336, 32, 32, 8, 128256, False)
    p70 = params(8192, 28672, 80, 64, 8, 128256, False)
    assert p8 == 8_030_261_248 and p70 == 70_553_706_496    # Meta's model cards: 8.03 B and 70.6 B
    s8, s70 = ModelShape.from_config(load("llama-3.1-8b")), ModelShape.from_config(load("llama-3.1-70b"))
    assert (s8.params, s70.params) == (p8, p70)
    settings = ProfileSettings(samples=8, seqlen=256, judge_samples=0)
    for shape, p in ((s8, p8), (s70, p70)):
        for nbytes in (4, 2):   # float32 and bfloat16 weights
            load_phase = profile_plan(shape, replace(settings, dtype_bytes=nbytes)).phase("load")
            assert load_phase.host_bytes - BASE_HOST_BYTES == p * nbytes
    # down_proj of 8B: H_O 4096², H_I and Σxxᵀ 14336², float64: 8·(4096² + 2·14336²) = 3.42 GB per half
    down = [x for x in s8.linears() if x.kind == "down_proj"]
    assert factor_sum_bytes(down[:1]) == 8 * (4096 ** 2 + 2 * 14336 ** 2) == 3_422_552_064
    # the whole 8B: README's 275 GB of float64 sums per calibration half
    assert factor_sum_bytes(s8.linears()) / 1e9 == pytest.approx(275.4, abs=0.1)
    # one 70B block's q_proj 8192×8192, k/v 1024×8192: 8·(3·8192²) + 2·8·(1024² + 2·8192²)
    attn = [x for x in s70.block_linears() if x.kind in ("q_proj", "k_proj", "v_proj")]
    assert factor_sum_bytes(attn) == 8 * 3 * 8192 ** 2 + 2 * 8 * (1024 ** 2 + 2 * 8192 ** 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_shapes_and_matmul_flops_match_the_real_model(family):
    """The linears, parameters and per-token matmul FLOPs from config.json against a tiny real model of the
    family: find_linears, its parameter count, and torch's FLOP counter over its forward."""
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from bitplan.models import find_linears

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[family]
    config = getattr(transformers, cls)(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        tie_word_embeddings=family == "qwen2")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    shape = ModelShape.from_config(config.to_dict())
    assert [(x.name, x.out_features, x.in_features) for x in shape.linears()] == \
        [(i.name, i.out_features, i.in_features) for i in find_linears(model)]
    assert shape.params == sum(p.numel() for p in model.parameters())   # tied weights counted once
    T = 6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.zeros(1, T, dtype=torch.long), use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in counts.items() if str(k) in ("aten.mm", "aten.addmm"))   # the linears and head
    attention = 2 * T * shape.q_dim * shape.layers   # per token, causal: half of the full T×T products
    assert matmul == pytest.approx(T * (shape.forward_flops(T) - attention), rel=1e-9)


def test_choose_factor_groups_is_the_smallest_that_fits():
    """Against a brute force over every G: the first whose plan fits."""
    shape = ModelShape.from_config(load("llama-3.2-1b"))
    settings = ProfileSettings(samples=8, seqlen=256, judge_samples=0, formats=4, grid_keys=0, noise_samples=1)
    n = len(shape.linears())
    for free_gib in (14, 20, 30, 60):
        free = Available(free_gib * GIB, None)
        G, plan = choose_factor_groups(shape, settings, free)
        fitting = [g for g in range(1, n + 1) if check(profile_plan(shape, replace(settings, factor_groups=g)),
                                                       free) is None]
        assert fitting, free_gib
        assert check(plan, free) is None and plan.factor_groups == G
        # G steps through 1, 2, 3, 4, 5, 6, 8, 10, 13, …: the first step that fits, at most 34 % above the least G
        assert fitting[0] <= G <= max(fitting[0] + 1, int(fitting[0] * 1.34)), (G, fitting[0])


def test_a_job_that_cannot_fit_says_what_to_change():
    plan = profile_plan(load("llama-3.1-8b"), ProfileSettings(samples=8, seqlen=256, judge_samples=0))
    line = check(plan, Available(24 * GIB, None))
    assert line is not None and "\n" not in line
    assert "factors" in line and "--factor-groups" in line
    assert check(plan, Available(plan.host_bytes, None)) is None
    gpu = profile_plan(load("llama-3.1-8b"), ProfileSettings(samples=8, seqlen=256, judge_samples=0,
                                                            device="cuda", dtype_bytes=2, factor_groups=32))
    line = check(gpu, Available(1e15, 10 * GIB))
    assert line is not None and "device memory" in line


def run_main(monkeypatch, *args) -> int:
    """The console entry point's exit code (0 when it returns)."""
    from bitplan.cli import main

    monkeypatch.setattr(sys, "argv", ["bitplan", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return e.code or 0
    return 0


def test_dry_run_on_a_folder_with_only_config_json(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3.1-8b.json").read_text())
    monkeypatch.setenv("COLUMNS", "200")
    assert run_main(monkeypatch, "profile", folder, "--dry-run", "--samples", "16", "--seqlen", "2048",
                    "--device", "cpu") == 0
    out = capsys.readouterr().out
    for phase in ("noise", "factors", "layers", "formats", "judge", "hessians/"):
        assert phase in out
    assert "8.03 B parameters" in out
    assert not (tmp_path / "profile-llama-3.1-8b").exists() and list(folder.iterdir()) == [folder / "config.json"]


def test_a_real_run_that_cannot_fit_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """70B on this machine: refused from its config.json alone, before any weight is looked for."""
    import bitplan.profile

    folder = tmp_path / "llama-3.1-70b"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3.1-70b.json").read_text())
    monkeypatch.setattr(bitplan.profile, "profile_model", lambda *a, **k: pytest.fail("the job was started"))
    assert run_main(monkeypatch, "profile", folder, "--out", tmp_path / "prof", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the profile needs") and "is free:" in err[-1]
    assert not any(line.startswith("error") for line in err[:-1])


def test_format_errors_are_the_rotated_matrix_and_one_block_of_rows():
    """By hand: Llama-3.2-1B's 128256 × 2048 embedding is measured 794 rows at a time (256 MiB / (165 · 2048));
    a matrix smaller than a block is one block. The planner's block is relerr's."""
    from bitplan.profile import relerr
    from bitplan.resources import FORMAT_BLOCK_BYTES, FORMAT_BLOCK_SIZING, format_bytes

    assert (FORMAT_BLOCK_BYTES, FORMAT_BLOCK_SIZING) == (relerr.BLOCK_BYTES, relerr.WORK_BYTES_PER_WEIGHT)
    assert relerr.block_rows(128256, 2048) == 794
    assert format_bytes(128256, 2048, 4) == 4 * 128256 * 2048 + 794 * 2048 * (45 + 30 * 4)
    assert format_bytes(128256, 2048, 1, copied=True) == 8 * 128256 * 2048 + 794 * 2048 * (45 + 30)
    assert format_bytes(576, 1536, 4) == 576 * 1536 * (4 + 165)
    shape = ModelShape.from_config(load("llama-3.2-1b"))
    plan = profile_plan(shape, ProfileSettings(samples=8, seqlen=256, judge_samples=0, grid_keys=4))
    assert plan.phase("formats").host_bytes - plan.phase("load").host_bytes == \
        pytest.approx(format_bytes(128256, 2048, 4) + RUNTIME_HOST_BYTES)


def test_a_mixture_of_experts_config_is_refused_in_one_line():
    from bitplan.errors import BitplanError

    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 100, "num_local_experts": 8, "model_type": "mixtral"}
    with pytest.raises(BitplanError, match="mixture-of-experts model \\(8 experts"):
        ModelShape.from_config(config, "moe")
    ModelShape.from_config({**config, "num_local_experts": 1}, "dense")  # one expert is a dense MLP


def test_apply_forecast_by_hand_at_llama_3_2_1b():
    """apply's per-layer peak: the larger of the factors' LDL and the rounding's buffers, by hand. Llama-3.2-1B:
    hidden 2048, MLP 8192, vocabulary 128256."""
    from bitplan.resources import APPLY_WEIGHT_BUFFERS, LAZY_OPEN_BYTES, ApplySettings, apply_plan_resources

    config = load("llama-3.2-1b")
    s = ApplySettings(rounding="yaqa", workers=1)
    base = BASE_HOST_BYTES + LAZY_OPEN_BYTES

    def peak(formats, settings=s):
        return round(apply_plan_resources(config, formats, settings).host_bytes - base)   # the bases are floats

    m, n = 2048, 8192   # down_proj, yaqa: L of both sides (8·(n² + m²)) beside 8 float64 m×n buffers
    assert APPLY_WEIGHT_BUFFERS == 8
    down = 8 * 8 * m * n + 8 * (n * n + m * m)
    assert peak({"model.layers.0.mlp.down_proj": "int4-g128"}) == down == 1644167168
    # its LDL step: two n×n of the side being split beside the other side's, and W in float32
    assert 8 * (n * n + m * m + n * n) + 4 * m * n < down
    # λs chosen in apply (no profile choice for these factors): both halves of H_O, H_I and Σxxᵀ in float64,
    # and 12 float64 buffers per side for the held-out LDLs, before the rounding
    choice = 2 * 8 * (m * m + 2 * n * n) + 12 * 8 * (m * m + n * n)
    assert peak({"model.layers.0.mlp.down_proj": "int4-g128"}, replace(s, choose_shrink=frozenset({"model.layers.0.mlp.down_proj"}))) \
        == choice == 9059696640
    # the embedding, 128256 × 2048, one-sided under the head's input moment (n = 2048)
    V, H = 128256, 2048
    emb = "model.embed_tokens"
    # its rows round alone (no output-side factor): blocks of 8192 rows (128 MiB in float64) with L beside them,
    # and the packed matrix twice as it is joined (q4_K: 147750912 bytes)
    rows = 128 * 2**20 // (8 * H)
    blocked = 8 * 8 * rows * H + 8 * H * H + 2 * 147750912
    assert rows == 8192 and peak({emb: "q4_K"}, replace(s, rounding="ldlq")) == blocked == 1402798080
    # int4-g128 rotates the vocabulary side, which mixes rows: the whole weight rotated in one float64 buffer
    rotated = 8 * 8 * rows * H + 8 * H * H + 2 * 139542544 + 8 * V * H
    assert peak({emb: "int4-g128"}, replace(s, rounding="ldlq")) == rotated == 3487727648
    # whole, as before row blocks: eight float64 copies of the 128256 × 2048 matrix
    assert 8 * 8 * V * H + 8 * H * H == 16844324864
    # a whole model with the embedding in q4_K peaks at its widest layer, not at the embedding
    assert peak({emb: "q4_K", "model.layers.0.mlp.down_proj": "int4-g128"}) == down
