"""Text sampled from the model itself (temperature 1, no truncation), written as JSON lines for `--calib`.

    python experiments/sample_text.py --out samples.jsonl --n 64 --tokens 300

The model's own distribution is the text its KL to a quantized copy is an expectation over when no other text
is at hand: a judge (or calibration) that belongs to no particular corpus. Sampling starts from the BOS token
alone; each document is decoded back to text, so profiling re-tokenizes it like any other source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.io import atomic_path  # noqa: E402
from bitplan.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=64, help="documents")
    parser.add_argument("--tokens", type=int, default=300, help="new tokens per document")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lm = load_model(args.model)
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    docs = []
    for s in track(range(0, args.n, args.batch), description="sampling"):
        b = min(args.batch, args.n - s)
        torch.manual_seed(args.seed * 1_000_003 + s)
        with torch.inference_mode():
            ids = lm.model.generate(torch.full((b, 1), start), attention_mask=torch.ones(b, 1, dtype=torch.long),
                                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                    pad_token_id=tok.eos_token_id)
        docs += tok.batch_decode(ids[:, 1:], skip_special_tokens=True)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text("".join(json.dumps({"id": f"sample-{k}", "text": d}) + "\n" for k, d in enumerate(docs)))
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters → {args.out}")


if __name__ == "__main__":
    main()
