"""Text for calibration and evaluation: plain text, JSONL with a `text` field, either of them compressed (.xz, .gz),
a built-in text shipped with bitplan, or a named Hugging Face dataset, cut into seeded, fixed-length token windows.

Documents are joined with the tokenizer's EOS token between them into one stream; windows are distinct
non-overlapping slices of that stream, chosen by a seeded permutation, so a window never depends on how many
others were asked for (the first k windows of a run with n > k are the same k windows).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BitplanError

HF_PREFIX = "hf:"
TEXTS_DIR = Path(__file__).resolve().parent / "texts"   # package data; texts/README.md gives sources and licences


@dataclass(frozen=True)
class BuiltinText:
    file: str                  # in bitplan/texts/
    about: str


# Built-in names resolve to the texts shipped with bitplan, as `smollm2-135m` does among models. The recorded
# sha256 of a compressed file is of its decompressed bytes, so a text keeps its fingerprint however it is stored.
BUILTIN_TEXTS = {
    "sotu": BuiltinText("sotu.jsonl.xz", "233 State of the Union addresses, 1790-2021 (public domain)"),
    "wikitext2": BuiltinText("wikitext2-test.raw.xz", "WikiText-2 raw test split (CC BY-SA 3.0)"),
}
DEFAULT_CALIBRATION = "sotu"
DEFAULT_EVALUATION = "wikitext2"
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}


@dataclass(frozen=True)
class TextSource:
    spec: str                  # what the user passed
    sha256: str                # of the file's (decompressed) bytes, or of the dataset spec
    documents: int

    def describe(self) -> dict:
        return {"source": self.spec, "sha256": self.sha256, "documents": self.documents}


def load_texts(source: str) -> list[str]:
    """Documents from `source`: a .txt file (one document), a .jsonl file (one per line, field "text"), either
    compressed as .xz or .gz, a built-in name (see BUILTIN_TEXTS), or `hf:NAME[:CONFIG[:SPLIT]]` (a Hugging Face
    dataset, where `datasets` and a network are available)."""
    if source.startswith(HF_PREFIX):
        return _nonempty(source, _read_hf(source[len(HF_PREFIX):]))
    path = text_path(source)
    return _nonempty(source, _parse(source, path, _read_bytes(source, path)))


def describe_source(source: str) -> TextSource:
    if source.startswith(HF_PREFIX):
        return TextSource(spec=source, sha256=hashlib.sha256(source.encode()).hexdigest(),
                          documents=len(load_texts(source)))
    path = text_path(source)
    raw = _read_bytes(source, path)
    return TextSource(spec=source, sha256=hashlib.sha256(raw).hexdigest(),
                      documents=len(_nonempty(source, _parse(source, path, raw))))


def text_path(source: str) -> Path:
    """The file a text spec names: a built-in text's packaged file, else the path itself (checked to exist)."""
    if source in BUILTIN_TEXTS:
        path = TEXTS_DIR / BUILTIN_TEXTS[source].file
        if not path.is_file():
            raise BitplanError(f"the built-in text {source} is missing from this installation ({path}); "
                               "reinstall bitplan")
        return path
    p = Path(source).expanduser()
    if not p.exists():
        raise BitplanError(f"text file not found: {source} (built-in texts: {', '.join(BUILTIN_TEXTS)}; "
                           f"for a Hugging Face dataset write hf:NAME[:CONFIG[:SPLIT]])")
    if p.is_dir():
        raise BitplanError(f"{source} is a folder; pass a .txt or .jsonl file (optionally .xz or .gz)")
    return p


def _read_bytes(source: str, path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .xz or .gz."""
    opener = COMPRESSED.get(path.suffix.lower())
    if opener is None:
        return path.read_bytes()
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise BitplanError(f"{source}: not a readable {path.suffix} file ({type(e).__name__}: {e})") from None


def _parse(source: str, path: Path, raw: bytes) -> list[str]:
    """Documents in the file's bytes: per line of a .jsonl/.ndjson (before any compression suffix), else one."""
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="replace").read()  # universal newlines
    if not name.endswith((".jsonl", ".ndjson")):
        return [text]
    texts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BitplanError(f"{source}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BitplanError(f"{source}, line {i}: expected an object with a string field \"text\"")
        texts.append(record["text"])
    return texts


def _nonempty(source: str, texts: list[str]) -> list[str]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BitplanError(f"{source} holds no text")
    return texts


def _read_hf(spec: str) -> list[str]:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise BitplanError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise BitplanError(f"could not load dataset {name} ({config}, {split}): {type(e).__name__}: {e}") from None
    if "text" not in ds.column_names:
        raise BitplanError(f"dataset {name} has no \"text\" column (columns: {', '.join(ds.column_names)})")
    return list(ds["text"])


def needs_bos(tokenizer) -> bool:
    """True when the tokenizer puts BOS in front of encoded text (Llama-2/3 style): windows then start with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized (without special tokens) and joined by EOS into one 1-D stream."""
    eos = getattr(tokenizer, "eos_token_id", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than the model's maximum": we cut windows ourselves
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces: list[int] = []
    for i, ids in enumerate(encoded):
        if i and eos is not None:
            pieces.append(eos)
        pieces.extend(ids)
    return torch.tensor(pieces, dtype=torch.long)


def token_windows(tokenizer, source: str, n_windows: int, seqlen: int, seed: int = 0,
                  max_context: int | None = None) -> torch.Tensor:
    """`n_windows` distinct token windows of length `seqlen` from `source`, chosen by `seed`: LongTensor [n, seqlen]."""
    return placed_token_windows(tokenizer, source, n_windows, seqlen, seed, max_context)[0]


def placed_token_windows(tokenizer, source: str, n_windows: int, seqlen: int, seed: int = 0,
                         max_context: int | None = None,
                         exclude: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_windows` and where each window starts in the source's token stream (LongTensor [n]): the profile
    can split its windows by where they come from in the text. `exclude` lists (start, length) spans of the
    stream that no window may touch (say, another run's calibration windows, from `calibration_spans`)."""
    if n_windows <= 0:
        raise BitplanError(f"the number of windows must be positive (got {n_windows})")
    if seqlen < 2:
        raise BitplanError(f"the window length must be at least 2 tokens (got {seqlen})")
    if max_context is not None and seqlen > max_context:
        raise BitplanError(f"a window of {seqlen} tokens is longer than the model's context of {max_context}")
    stream = token_stream(tokenizer, load_texts(source))
    bos = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    body = seqlen - 1 if bos is not None else seqlen
    slots = len(stream) // body
    if slots == 0:
        raise BitplanError(f"{source} has {len(stream)} tokens, shorter than one window of {seqlen}")
    free = torch.arange(slots) if not exclude else _free_slots(len(stream), slots, body, exclude)
    available = len(free)
    if n_windows > available:
        outside = f" outside the {len(exclude)} excluded spans" if exclude else ""
        raise BitplanError(f"{source} has {len(stream)} tokens: {available} windows of {seqlen}{outside} at most, "
                           f"{n_windows} asked for")
    order = free[torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]]
    windows = stream[: slots * body].view(slots, body)[order]
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), windows], dim=1)
    return windows, order * body


def _free_slots(stream_len: int, slots: int, body: int, exclude: list[tuple[int, int]]) -> torch.Tensor:
    """Indices of the window slots [k·body, (k+1)·body) that overlap none of the excluded spans."""
    used = torch.zeros(stream_len, dtype=torch.bool)
    for start, length in exclude:
        used[max(start, 0):max(start + length, 0)] = True
    touched = used[: slots * body].view(slots, body).any(dim=1)
    return torch.nonzero(~touched).flatten()


def calibration_spans(tokenizer, calibration: dict, source: str) -> list[tuple[int, int]]:
    """The (start, length) spans of `source`'s token stream that a profile's calibration windows covered,
    re-derived from its record (samples, seqlen, seed): what held-out windows of the same text must avoid. Empty
    when `source` is not the calibration text (its sha256 differs), which then shares no window with it."""
    if not all(k in calibration for k in ("sha256", "samples", "seqlen", "seed")):
        raise BitplanError("the calibration record does not say which windows of which text it used")
    if describe_source(source).sha256 != calibration["sha256"]:
        return []
    samples, seqlen, seed = (int(calibration[k]) for k in ("samples", "seqlen", "seed"))
    _, starts = placed_token_windows(tokenizer, source, samples, seqlen, seed)
    body = seqlen - 1 if needs_bos(tokenizer) else seqlen
    return [(int(s), body) for s in starts]


def warn_if_same_source(calibration: dict | None, evaluation: TextSource) -> str | None:
    """A warning text when the evaluation text is the calibration text (the figure would be in-sample)."""
    if not calibration:
        return None
    if calibration.get("sha256") == evaluation.sha256 or calibration.get("source") == evaluation.spec:
        return (f"the evaluation text {evaluation.spec} is the calibration text of the candidate: "
                "its figures are in-sample; evaluate on text the method did not fit")
    return None
