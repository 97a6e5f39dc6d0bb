"""The reference-logit cache: a damaged entry is detected and recomputed, and the default cap holds an evaluation."""
from __future__ import annotations

import torch

import bitplan.evaluate as ev
from bitplan.evaluate import evaluate
from bitplan.logit_cache import LogitCache, default_cap
from bitplan.models import cache_dir

from tests.test_evaluate import noisy_copy_dir


def flip_exponent_byte(path, index: int) -> None:
    """Flip a bit of the exponent byte of float32 number `index` of a one-tensor safetensors file."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")   # the header's length, then the header, then the data
    data[start + 4 * index + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_detected_and_the_entry_dropped(tmp_path):
    cache = LogitCache(tmp_path / "c", max_bytes=10**6)
    logits = torch.randn(16, 50)
    cache.put("k", logits)
    assert torch.equal(cache.get("k"), logits)
    path = tmp_path / "c" / "k.safetensors"
    flip_exponent_byte(path, 123)
    assert cache.get("k") is None and not path.exists()


def test_a_damaged_entry_is_recomputed_and_the_kl_unchanged(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))   # only this test's entries: others share the worker's
    args = (str(tiny_model_dir), str(noisy), str(tiny_text))
    first = evaluate(*args, windows=2, seqlen=32, progress=False)
    entries = sorted((cache_dir() / "logits").glob("*.safetensors"))
    assert len(entries) == 2
    flip_exponent_byte(entries[0], 5 * 300 + 7)
    calls = []
    real = ev._logits
    monkeypatch.setattr(ev, "_logits", lambda m, w: calls.append(1) or real(m, w))
    second = evaluate(*args, windows=2, seqlen=32, progress=False)
    assert len(calls) == 3   # both candidate windows and the one damaged reference window
    assert second.kl_mean == first.kl_mean and second.ppl_reference == first.ppl_reference


def test_the_default_cap_holds_the_default_evaluation():
    # 32 windows × 512 tokens × 49,152 vocabulary × 4 bytes (float32): 3.2 GB, more than the old 2 GiB cap
    need = 32 * 512 * 49_152 * 4
    assert need > 2 * 2**30
    assert default_cap(32, 512, 49_152) >= need
    assert default_cap(2, 32, 300) == 2 * 2**30   # small evaluations keep the floor


def test_evaluate_sizes_its_cache_for_the_evaluation(tiny_model_dir, tiny_text, monkeypatch):
    asked, caps = [], []
    real = ev.LogitCache
    monkeypatch.setattr(ev, "LogitCache", lambda root, cap: caps.append(cap) or real(root, cap))
    monkeypatch.setattr(ev, "default_cap", lambda w, t, v: asked.append((w, t, v)) or 12345678)
    evaluate(str(tiny_model_dir), str(tiny_model_dir), str(tiny_text), windows=3, seqlen=16, progress=False)
    from transformers import AutoConfig

    assert asked == [(3, 16, AutoConfig.from_pretrained(tiny_model_dir).vocab_size)] and caps == [12345678]
    evaluate(str(tiny_model_dir), str(tiny_model_dir), str(tiny_text), windows=3, seqlen=16, progress=False,
             cache_gb=0.5)
    assert caps[-1] == 2**29   # a cap given is kept
