"""Tiny random Llama models and token ids for the profile tests (seconds, no tokenizer needed)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def token_ids(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))




class Interrupt(Exception):
    """What the tests raise from a profile's `events` callback to kill it at a chosen point."""


def stop_at(phase: str, count: int):
    def events(p: str, c: int) -> None:
        if p == phase and c == count:
            raise Interrupt(f"{p} {c}")
    return events
