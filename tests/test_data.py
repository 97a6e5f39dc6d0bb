"""Text loading and token windows."""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from pathlib import Path

import pytest
import torch

from bitplan.data import (BUILTIN_TEXTS, TEXTS_DIR, calibration_spans, describe_source, load_texts, needs_bos,
                          placed_token_windows, text_path, token_stream, token_windows, warn_if_same_source)
from bitplan.errors import BitplanError

from tests.conftest import TINY_TEXT, make_tokenizer


def test_jsonl_and_txt(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"id": i, "text": f"document {i}"}) for i in range(3)) + "\n\n")
    assert load_texts(str(j)) == ["document 0", "document 1", "document 2"]
    t = tmp_path / "d.txt"
    t.write_text("hello\nworld\n")
    assert load_texts(str(t)) == ["hello\nworld\n"]


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ("   \n\n", "holds no text"),
])
def test_empty_text(tmp_path, content, message):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(BitplanError, match=message):
        load_texts(str(p))


def test_malformed_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(BitplanError, match="line 2"):
        load_texts(str(p))
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(BitplanError, match="line 2: not valid JSON"):
        load_texts(str(p))


def test_missing_file():
    with pytest.raises(BitplanError, match="not found"):
        load_texts("/no/such/file.txt")


# sha256 of the decompressed texts, computed with `xz -dc FILE | sha256sum` when they were added (bitplan/texts/README.md)
SHIPPED = {
    "sotu": ("sotu.jsonl.xz", "a0280bf651899bd87b99d89071419b56ca478e32d324fd5e8d6e7c819bcd301e", 233),
    "wikitext2": ("wikitext2-test.raw.xz", "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a", 1),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_builtin_texts_resolve_to_the_shipped_files(name):
    file, sha256, documents = SHIPPED[name]
    assert set(BUILTIN_TEXTS) == set(SHIPPED)
    assert text_path(name) == TEXTS_DIR / file and TEXTS_DIR == Path(__file__).resolve().parents[1] / "bitplan" / "texts"
    source = describe_source(name)
    assert (source.spec, source.sha256, source.documents) == (name, sha256, documents)
    assert hashlib.sha256(lzma.decompress((TEXTS_DIR / file).read_bytes())).hexdigest() == sha256


def test_builtin_texts_content():
    sotu = load_texts("sotu")
    assert sotu[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    wiki = load_texts("wikitext2")
    assert wiki[0].startswith(" = Robert Boulter = ") and "\n\n" not in wiki[0]   # blank lines removed


def test_shipped_profile_calibration_is_the_builtin_text():
    """The shipped profile records its calibration as `sotu` with the decompressed text's sha256, so `eval
    --exclude-calibration --data sotu` finds the text its windows came from (calibration_spans compares sha256s)."""
    profile = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m" / "profile.json"
    calibration = json.loads(profile.read_text())["calibration"]
    assert calibration["source"] == "sotu"
    assert describe_source(calibration["source"]).sha256 == calibration["sha256"]
    tok = make_tokenizer()
    assert calibration_spans(tok, calibration, "wikitext2") == []   # another text: nothing to exclude


@pytest.mark.parametrize("name", ["docs.jsonl", "doc.txt"])
def test_compressed_copies_read_like_the_plain_file(tmp_path, name):
    """A .gz and an .xz copy give the same documents and the same sha256 as the uncompressed file."""
    lines = [json.dumps({"id": i, "text": f"document {i}: caf\u00e9 \u2014 {'word ' * i}"}) for i in range(5)]
    raw = ("\n".join(lines) + "\n").encode() if name.endswith(".jsonl") else "one document\r\nover two lines\n".encode()
    plain = tmp_path / name
    plain.write_bytes(raw)
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
    (tmp_path / f"{name}.xz").write_bytes(lzma.compress(raw))
    want = load_texts(str(plain))
    assert len(want) == (5 if name.endswith(".jsonl") else 1)
    for copy in (f"{name}.gz", f"{name}.xz"):
        path = str(tmp_path / copy)
        assert load_texts(path) == want
        assert describe_source(path).sha256 == hashlib.sha256(raw).hexdigest() == describe_source(str(plain)).sha256
        assert describe_source(path).documents == len(want)


def test_damaged_compressed_file(tmp_path):
    bad = tmp_path / "docs.jsonl.xz"
    bad.write_bytes(lzma.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(BitplanError, match="not a readable .xz file"):
        load_texts(str(bad))
    (tmp_path / "docs.txt.gz").write_bytes(b"plain bytes, no gzip header")
    with pytest.raises(BitplanError, match="not a readable .gz file"):
        load_texts(str(tmp_path / "docs.txt.gz"))


def test_windows_are_seeded_distinct_and_prefix_stable(tiny_text, tiny_tokenizer):
    a = token_windows(tiny_tokenizer, str(tiny_text), 6, 32, seed=1)
    b = token_windows(tiny_tokenizer, str(tiny_text), 6, 32, seed=1)
    c = token_windows(tiny_tokenizer, str(tiny_text), 3, 32, seed=1)
    d = token_windows(tiny_tokenizer, str(tiny_text), 6, 32, seed=2)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a[:3], c) and not torch.equal(a, d)
    # Windows are non-overlapping slices of the token stream.
    stream = token_stream(tiny_tokenizer, load_texts(str(tiny_text)))
    starts = []
    for w in a:
        hits = [s for s in range(0, len(stream) - 31, 32) if torch.equal(stream[s:s + 32], w)]
        assert hits, "every window is a slice of the stream at a window boundary"
        starts.append(hits[0])
    assert len(set(starts)) == 6
    # placed_token_windows says where each one starts.
    windows, positions = placed_token_windows(tiny_tokenizer, str(tiny_text), 6, 32, seed=1)
    assert torch.equal(windows, a) and len(set(positions.tolist())) == 6
    for w, start in zip(windows, positions.tolist()):
        assert start % 32 == 0 and torch.equal(stream[start:start + 32], w)


def test_bos_is_prepended_only_when_the_tokenizer_uses_it(tiny_text):
    plain, with_bos = make_tokenizer(bos=False), make_tokenizer(bos=True)
    assert not needs_bos(plain) and needs_bos(with_bos)
    w = token_windows(with_bos, str(tiny_text), 4, 16, seed=0)
    assert (w[:, 0] == with_bos.bos_token_id).all() and (w[:, 1:] != with_bos.bos_token_id).all()
    w = token_windows(plain, str(tiny_text), 4, 16, seed=0)
    assert (w != plain.bos_token_id).all()
    # With BOS a window holds 15 tokens of text, starting where placed_token_windows says.
    stream = token_stream(with_bos, load_texts(str(tiny_text)))
    w, positions = placed_token_windows(with_bos, str(tiny_text), 4, 16, seed=0)
    for row, start in zip(w, positions.tolist()):
        assert start % 15 == 0 and torch.equal(row[1:], stream[start:start + 15])


def test_window_errors(tmp_path, tiny_tokenizer, tiny_text):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(BitplanError, match="shorter than one window"):
        token_windows(tiny_tokenizer, str(short), 1, 512)
    with pytest.raises(BitplanError, match="must be positive"):
        token_windows(tiny_tokenizer, str(tiny_text), 0, 16)
    with pytest.raises(BitplanError, match="longer than the model's context"):
        token_windows(tiny_tokenizer, str(tiny_text), 1, 512, max_context=256)
    with pytest.raises(BitplanError, match="windows of 64 at most"):
        token_windows(tiny_tokenizer, str(tiny_text), 10_000, 64)


def test_excluded_spans_are_never_touched(tiny_text):
    """Windows drawn around a calibration's windows share no token position with them, whatever the lengths."""
    tok = make_tokenizer(bos=True)
    calib = {"sha256": describe_source(str(tiny_text)).sha256, "samples": 5, "seqlen": 12, "seed": 3}
    spans = calibration_spans(tok, calib, str(tiny_text))
    _, starts = placed_token_windows(tok, str(tiny_text), 5, 12, seed=3)
    assert spans == [(int(s), 11) for s in starts]
    covered = {t for start, length in spans for t in range(start, start + length)}
    stream_len = len(token_stream(tok, load_texts(str(tiny_text))))
    slots = stream_len // 15
    free = [k for k in range(slots) if not covered & set(range(15 * k, 15 * k + 15))]
    assert 0 < len(free) < slots - 2   # the calibration blocks some slots (5 windows of 11 touch 3 or more)
    windows, positions = placed_token_windows(tok, str(tiny_text), len(free), 16, seed=0, exclude=spans)
    assert sorted(p // 15 for p in positions.tolist()) == free   # every free slot, and only those
    # a prefix of them, seeded, and the text is where the positions say
    few, pos = placed_token_windows(tok, str(tiny_text), 2, 16, seed=0, exclude=spans)
    assert torch.equal(few, windows[:2]) and torch.equal(pos, positions[:2])
    with pytest.raises(BitplanError, match="outside the 5 excluded spans"):
        placed_token_windows(tok, str(tiny_text), len(free) + 1, 16, seed=0, exclude=spans)
    # another text shares nothing with the calibration; a record without its windows is refused
    assert calibration_spans(tok, {**calib, "sha256": "0" * 64}, str(tiny_text)) == []
    with pytest.raises(BitplanError, match="which windows"):
        calibration_spans(tok, {"sha256": calib["sha256"]}, str(tiny_text))


def test_same_source_warning(tiny_text):
    src = describe_source(str(tiny_text))
    assert warn_if_same_source({"source": "elsewhere", "sha256": src.sha256}, src)
    assert warn_if_same_source({"source": "elsewhere", "sha256": "0" * 64}, src) is None
    assert warn_if_same_source(None, src) is None
