"""The tokenizer as GGUF metadata: a byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2") with its merges,
token types, special token ids, chat template and llama.cpp's pre-tokenizer name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf

from ..errors import BitplanError

# llama.cpp names the pre-tokenizer (how text is split before BPE) per known tokenizer. Known vocabularies by the
# sha256 of their tokens in id order, one per line; any other byte-level BPE vocabulary gets "default".
KNOWN_PRE_TOKENIZERS = {
    # SmolLM and SmolLM2 (HuggingFaceTB): digits split one by one before the byte-level split
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",
}


def vocab_fingerprint(tokens: list[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def _bpe_model(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"GGUF export needs the checkpoint's tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE":
        raise BitplanError(f"GGUF export writes byte-level BPE tokenizers; {path} holds a "
                           f"{model.get('type', 'unknown')} model")
    return model


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> dict:
    """Add the tokenizer of the checkpoint `folder` to `writer`; returns {"pre": name, "tokens": count}."""
    from transformers import AutoTokenizer

    from ..models import _quiet_transformers

    _bpe_model(folder)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # transformers raises many types for a broken tokenizer folder
            raise BitplanError(f"{folder} has no usable tokenizer ({type(e).__name__}: {e})") from None
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise BitplanError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is "
                           f"{vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalized form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    pre = KNOWN_PRE_TOKENIZERS.get(vocab_fingerprint(tokens), "default")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise BitplanError(f"{folder}/tokenizer.json has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return {"pre": pre, "tokens": len(tokens)}
