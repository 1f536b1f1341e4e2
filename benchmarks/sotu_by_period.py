"""Student / teacher perplexity on State of the Union addresses by period: how far a student's gap
grows with the distance in time from the text it was trained on.

    PYTHONPATH=. python benchmarks/sotu_by_period.py STUDENT [STUDENT...] [--teacher smollm2-135m]

The bundled split trains on the addresses of 1790-1989, validates on 1990-2000 and tests on
2001-2021. For each period, the addresses (in the file's order, by year) are tokenised without
special tokens, each followed by EOS, and the first ``--tokens`` (+1) tokens are scored by
lmdistill's perplexity protocol, ``--window`` new tokens a window (every token predicted once,
with up to ``--window`` tokens of context). Prints perplexities and each student's ratio to the
teacher.
"""

from __future__ import annotations

import argparse
import json
import lzma

import numpy as np
import torch

from lmdistill.data.corpora import corpus_path
from lmdistill.data.prepare import tokenize_documents
from lmdistill.evaluate.perplexity import PerplexityProtocol, perplexity
from lmdistill.models.load import load_model, load_tokenizer

PERIODS = [(1790, 1850), (1900, 1940), (1960, 1989), (1990, 2000), (2001, 2021)]


def period_tokens(tokenizer, first: int, last: int, tokens: int) -> torch.Tensor:
    with lzma.open(corpus_path("sotu"), "rt", encoding="utf-8") as f:
        texts = [row["text"] for row in map(json.loads, f) if first <= int(row["year"]) <= last]
    return torch.from_numpy(tokenize_documents(tokenizer, texts)[: tokens + 1].astype(np.int64))


def period_perplexity(model, ids: torch.Tensor, window: int) -> float:
    # Windows of window + 1 tokens at stride window: each scores the next `window` tokens, every
    # one predicted once, with up to `window` tokens of context.
    return perplexity(model, ids, PerplexityProtocol(window=window + 1, stride=window)).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", help="student MODELs (sharing the teacher's tokenizer)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens scored per period")
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.teacher)
    data = {f"{a}-{b}": period_tokens(tokenizer, a, b, args.tokens) for a, b in PERIODS}
    teacher_model = load_model(args.teacher)
    teacher = {p: period_perplexity(teacher_model, ids, args.window) for p, ids in data.items()}
    print("| model | " + " | ".join(data) + " |\n|---|" + "---:|" * len(data))
    print(f"| teacher {args.teacher} | " + " | ".join(f"{v:.1f}" for v in teacher.values()) + " |")
    for spec in args.students:
        model = load_model(spec)
        ppl = {p: period_perplexity(model, ids, args.window) for p, ids in data.items()}
        print(f"| {spec} | " + " | ".join(f"{ppl[p]:.1f} ({ppl[p] / teacher[p]:.2f}x)" for p in data) + " |")


if __name__ == "__main__":
    main()
