"""bitplan.offload and how eval holds its models: one at a time, and one larger than its memory offloaded by
accelerate with the same figures as in memory."""
from __future__ import annotations

import weakref

import pytest
import torch

import bitplan.evaluate as ev
import bitplan.offload as offload
from bitplan.evaluate import evaluate
from bitplan.io import read_json
from bitplan.models import load_model
from bitplan.offload import GIB, PROCESS_BYTES, block_places, plan_placement, weight_bytes
from bitplan.devices import Available

from tests.test_evaluate import noisy_copy_dir

FIGURES = ("kl_mean", "kl_max", "kl_p99", "top1_agreement", "ppl_reference", "ppl_candidate", "rms_dp")


def test_weight_bytes_from_the_safetensors_headers(tiny_model_dir):
    state = load_model(str(tiny_model_dir)).model.state_dict()
    stored = sum(t.numel() * t.element_size() for t in state.values())   # float32 as saved
    assert weight_bytes(tiny_model_dir, torch.float32) == stored
    assert weight_bytes(tiny_model_dir, torch.bfloat16) == stored // 2
    (tiny_model_dir / "model.safetensors").unlink()   # no shards to read: the weight files' size
    (tiny_model_dir / "pytorch_model.bin").write_bytes(bytes(4000))
    assert weight_bytes(tiny_model_dir, torch.float32) == 4000
    assert weight_bytes(tiny_model_dir, torch.float32, {"torch_dtype": "bfloat16"}) == 8000


def test_block_places_from_a_device_map():
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.self_attn": "cpu",
             "model.layers.1.mlp": "disk", "model.layers.2": "disk", "model.layers.10": "cpu",
             "model.norm": "disk", "lm_head": "cpu"}
    assert block_places(split, "model.layers", 3) == [{"cpu"}, {"cpu", "disk"}, {"disk"}]
    assert block_places({"": "disk"}, "model.layers", 2) == [{"disk"}, {"disk"}]
    assert block_places({"model": 0, "lm_head": "cpu"}, "model.layers", 1) == [{"0"}]


def test_placement_budget(tiny_model_dir, monkeypatch):
    config = read_json(tiny_model_dir / "config.json", "config")
    weights = weight_bytes(tiny_model_dir, torch.float32)
    free = {"host": 10 * GIB, "device": None}
    monkeypatch.setattr(offload, "available", lambda device: Available(free["host"], free["device"]))
    cpu = torch.device("cpu")

    p = plan_placement(tiny_model_dir, config, torch.float32, cpu, working_bytes=GIB)
    assert p.budget_bytes == 10 * GIB - GIB - PROCESS_BYTES and not p.offloaded
    assert p.max_memory() == {"cpu": p.budget_bytes}
    free["host"] = weights + GIB + PROCESS_BYTES - 1   # one byte short
    assert plan_placement(tiny_model_dir, config, torch.float32, cpu, working_bytes=GIB).offloaded
    assert not plan_placement(tiny_model_dir, config, torch.bfloat16, cpu, working_bytes=GIB).offloaded
    # an explicit cap wins over what is free
    p = plan_placement(tiny_model_dir, config, torch.float32, cpu, working_bytes=GIB, max_memory_gb=0.5)
    assert p.budget_bytes == GIB // 2 and not p.offloaded
    # from a GPU: its free memory less the working set; what does not fit goes to the host, then to disk
    free.update(host=8 * GIB, device=weights + 100)
    p = plan_placement(tiny_model_dir, config, torch.float32, torch.device("cuda:1"), working_bytes=200)
    assert p.offloaded and p.max_memory() == {1: weights - 100, "cpu": 8 * GIB - PROCESS_BYTES}


def test_offloaded_evaluation_equals_the_one_in_memory(tiny_model_dir, tiny_text, tmp_path, capsys):
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    args = (str(tiny_model_dir), str(noisy), str(tiny_text))
    plain = evaluate(*args, windows=3, seqlen=32, cache=False, progress=False)
    assert not plain.memory_notes
    capsys.readouterr()
    tight = evaluate(*args, windows=3, seqlen=32, cache=False, progress=False, max_memory_gb=1e-5)
    assert len(tight.memory_notes) == 2 and all("to disk" in line for line in tight.memory_notes)
    assert "accelerate keeps 0 of 2 decoder blocks" in capsys.readouterr().err
    for key in FIGURES:
        assert getattr(tight, key) == getattr(plain, key), key


def test_the_two_models_are_never_held_at_once(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    held = []
    real = ev.open_model

    def tracking(spec, *args):
        assert all(ref() is None for ref in held), f"{spec} was opened while the other model was still held"
        lm = real(spec, *args)
        held.append(weakref.ref(lm.model))
        return lm

    monkeypatch.setattr(ev, "open_model", tracking)
    r = evaluate(str(tiny_model_dir), str(noisy), str(tiny_text), windows=2, seqlen=32, cache=False,
                 progress=False)
    assert len(held) == 2 and r.kl_mean > 0


def test_staged_logits_are_removed_and_the_cache_keeps_them(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    """Without the cache the reference's logits live in a temporary folder for the evaluation only; with a cap
    too small for them the cache is left as it was."""
    from bitplan.models import cache_dir

    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))   # only this test's entries
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    args = (str(tiny_model_dir), str(noisy), str(tiny_text))
    first = evaluate(*args, windows=2, seqlen=32, cache=False, progress=False)
    logits = cache_dir() / "logits"
    assert not list(logits.glob("*")) and not list((cache_dir() / "scratch").glob("*"))
    small = evaluate(*args, windows=2, seqlen=32, cache_gb=1e-6, progress=False)
    assert not list(logits.glob("*")) and small.kl_mean == first.kl_mean
    cached = evaluate(*args, windows=2, seqlen=32, progress=False)
    assert len(list(logits.glob("*.safetensors"))) == 2 and cached.kl_mean == first.kl_mean


def test_eval_cli_says_it_offloads(cli, tiny_model_dir, tiny_text):
    code, out, err = cli("eval", "-r", tiny_model_dir, "-c", tiny_model_dir, "-d", tiny_text, "-n", "2", "-t", "32",
                         "--no-cache", "--max-memory", "0.00001")
    assert code == 0 and "offloads the others to disk" in " ".join(err.split()) and "KL mean" in out
    code, out, err = cli("eval", "-r", tiny_model_dir, "-c", tiny_model_dir, "-d", tiny_text, "--max-memory", "0")
    assert code != 0 and "--max-memory must be positive" in err


@pytest.mark.parametrize("same", [True, False])
def test_the_cache_is_read_without_loading_the_reference(tiny_model_dir, tiny_text, tmp_path, monkeypatch, same):
    cand = tiny_model_dir if same else noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    args = (str(tiny_model_dir), str(cand), str(tiny_text))
    first = evaluate(*args, windows=2, seqlen=32, progress=False)
    opened = []
    real = ev.open_model
    monkeypatch.setattr(ev, "open_model", lambda spec, *a: opened.append(spec) or real(spec, *a))
    again = evaluate(*args, windows=2, seqlen=32, progress=False)
    assert opened == ([] if same else [str(cand)]) and again.kl_mean == first.kl_mean
