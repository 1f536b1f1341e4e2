"""benchmarks/teacher_cache.py: the data it cuts from the bundled corpora and the table it prints
(the runs themselves are the CLI's, tested in test_teacher_cache.py)."""

from __future__ import annotations

import argparse

from lmdistill.data.corpora import CORPORA, corpus_documents

from .helpers import load_benchmark


def test_data_takes_an_equal_share_of_each_corpus_split(tmp_path):
    bench = load_benchmark("teacher_cache")
    out = bench.write_data(tmp_path / "data", train_chars=3000, eval_chars=600)
    train = (out / "train.txt").read_text(encoding="utf-8")
    for name in CORPORA:
        first = "\n\n".join(d.text for d in corpus_documents(name, "train"))[:1000]
        assert first in train
        held_out = "\n\n".join(d.text for d in corpus_documents(name, "test"))[:200]
        assert held_out in (out / "test.txt").read_text(encoding="utf-8") and held_out not in train
    assert len(train) == 3000 + 2 * (len(CORPORA) - 1)  # the shares and their separators
    before = (out / "train.txt").stat().st_mtime_ns
    bench.write_data(tmp_path / "data", train_chars=3000, eval_chars=600)
    assert (out / "train.txt").stat().st_mtime_ns == before  # same text: not rewritten


def test_report_gives_gaps_and_speed_ratios_against_live():
    bench = load_benchmark("teacher_cache")
    results = {
        "live": {"val_ppl": {"0": 800.0, "20": 100.0}, "tokens_per_s": 200.0, "train_seconds": 100.0,
                 "cache_build_s": None},
        "cached": {"val_ppl": {"0": 800.0, "20": 102.0}, "tokens_per_s": 300.0, "train_seconds": 66.7,
                   "cache_build_s": 310.0},
    }
    args = argparse.Namespace(steps=20, top_k=64, tail_samples=64, train_chars=600_000, eval_tokens=8192)
    table = bench.report(results, args)
    assert "| 20 | 100.00 | 102.00 (+2.0%) |" in table
    assert "| cached | 300.0 | 1.50x | 66.7 | 310 |" in table
