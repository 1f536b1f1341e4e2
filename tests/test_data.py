"""lmdistill.data: corpus splits, sources, token shards, prepare/reuse and the block sampler."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmdistill.data import (
    CORPORA,
    SPLITS,
    BlockSampler,
    DataError,
    ShardError,
    corpus_documents,
    load_prepared,
    parse_source,
    prepare,
    read_shard,
    shard_info,
    tokenize_documents,
    write_shard,
)
from lmdistill.data import shards, sources
from lmdistill.data.corpora import CORPORA_DIR
from lmdistill.models.fingerprint import tokenizer_fingerprint

FP_A = "a" * 64
FP_B = "b" * 64


def _raw_rows(name: str) -> list[dict]:
    with lzma.open(CORPORA_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _words(i: int, n: int = 40) -> str:
    """A deterministic, distinct pseudo-sentence for document ``i``."""
    rng = np.random.default_rng(i)
    vocab = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deck", "night"]
    return f"doc{i} " + " ".join(vocab[j] for j in rng.integers(0, len(vocab), n)) + "."


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level tokenizer with its own eos, unlike GPT-2 in vocabulary and fingerprint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deck", "night", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


# ------------------------------------------------------------------------------ corpora


def _ids(name: str, split: str) -> list[str]:
    return [d.id for d in corpus_documents(name, split)]


def test_austen_split_matches_readme():
    assert _ids("austen", "test") == ["persuasion"]
    assert _ids("austen", "validation") == ["northangerabbey"]
    assert sorted(_ids("austen", "train")) == ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"]


def test_moby_dick_split_matches_readme():
    assert _ids("moby_dick", "test") == [f"chapter_{n}" for n in range(126, 136)] + ["epilogue"]
    assert _ids("moby_dick", "validation") == [f"chapter_{n}" for n in range(116, 126)]
    train = _ids("moby_dick", "train")
    assert train == ["etymology", "extracts"] + [f"chapter_{n}" for n in range(1, 116)]
    doc = corpus_documents("moby_dick", "validation")[0]
    assert doc.text and doc.title and doc.id == "chapter_116"


def test_sotu_split_by_year():
    years = {r["id"]: r["year"] for r in _raw_rows("sotu")}
    expected = {"test": range(2001, 2022), "validation": range(1990, 2001), "train": range(1790, 1990)}
    for split, allowed in expected.items():
        got = {years[i] for i in _ids("sotu", split)}
        assert got and got <= set(allowed), split
    assert {years[i] for i in _ids("sotu", "test")} == set(range(2001, 2022))


@pytest.mark.parametrize("name", CORPORA)
def test_corpus_splits_partition_every_document(name):
    all_ids = [r["id"] for r in _raw_rows(name)]
    per_split = {s: _ids(name, s) for s in SPLITS}
    assert all(per_split.values())
    seen = [i for ids in per_split.values() for i in ids]
    assert len(seen) == len(set(seen))  # no document in two splits
    assert sorted(seen) == sorted(all_ids)  # and none left out


def test_corpus_errors_list_valid_names():
    with pytest.raises(DataError, match="austen, moby_dick, sotu"):
        corpus_documents("shakespeare", "train")
    with pytest.raises(DataError, match="train, validation, test"):
        corpus_documents("austen", "dev")


# ------------------------------------------------------------------------------ shards


@pytest.mark.parametrize("vocab,dtype", [(50257, np.uint16), (65536, np.uint16), (100_000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=5000)
    tokens[:2] = [0, vocab - 1]
    path = tmp_path / "x.bin"
    write_shard(path, tokens, FP_A, vocab)
    back = read_shard(path, expected_fingerprint=FP_A)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)
    assert path.stat().st_size == shards.HEADER_BYTES + 5000 * np.dtype(dtype).itemsize
    info = shard_info(path)
    assert (info.num_tokens, info.vocab_size, info.fingerprint, info.version) == (5000, vocab, FP_A, 1)
    with pytest.raises(ValueError):
        back[0] = 1  # read-only memmap
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temp file left behind


def test_shard_empty_and_out_of_range(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), FP_A, 10)
    assert len(read_shard(tmp_path / "e.bin")) == 0
    with pytest.raises(ValueError, match="token ids"):
        write_shard(tmp_path / "o.bin", np.array([3, 10]), FP_A, 10)
    assert not (tmp_path / "o.bin").exists()
    assert list(tmp_path.glob("*.tmp")) == []


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda p: _patch(p, 0, np.int32(1234).tobytes()), "magic"),
        (lambda p: _patch(p, 4, np.int32(7).tobytes()), "version 7"),
        (lambda p: _patch(p, 8, np.int32(3).tobytes()), "dtype code 3"),
        (lambda p: os.truncate(p, p.stat().st_size - 2), "truncated"),
        (lambda p: p.open("ab").write(b"\0\0"), "padded"),
        (lambda p: os.truncate(p, 100), "shorter than"),
        (lambda p: p.unlink(), "does not exist"),
    ],
)
def test_corrupt_shard_is_detected(tmp_path, corrupt, message):
    path = tmp_path / "train.bin"
    write_shard(path, np.arange(100), FP_A, 50257)
    corrupt(path)
    with pytest.raises(ShardError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value) and "lmdistill prepare" in str(err.value)
    assert isinstance(err.value, DataError)


def test_shard_fingerprint_mismatch(tmp_path):
    path = tmp_path / "val.bin"
    write_shard(path, np.arange(10), FP_A, 50257)
    read_shard(path, expected_fingerprint=FP_A)
    with pytest.raises(ShardError, match="different tokenizer") as err:
        read_shard(path, expected_fingerprint=FP_B)
    assert "val.bin" in str(err.value)


# ------------------------------------------------------------------------------ tokenize


def test_tokenize_documents_appends_eos_and_matches_tokenizer(gpt2_tokenizer):
    texts = ["Hello world", " leading space and\n\nparagraphs", "Third doc.", "Fourth, the last one!"]
    got = tokenize_documents(gpt2_tokenizer, texts, batch_size=3)
    eos = gpt2_tokenizer.eos_token_id
    expected = []
    for t in texts:
        expected += gpt2_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype in (np.int64, np.uint32)
    ends = np.flatnonzero(got == eos)
    assert len(ends) == len(texts) and ends[-1] == len(got) - 1


def test_tokenize_long_document_without_warning(caplog):
    from lmdistill.models.load import load_tokenizer

    tok = load_tokenizer("gpt2")  # fresh: the warning fires once per tokenizer object
    tok.model_max_length = 1024  # the offline files do not say so
    text = "word " * 3000  # > 1024 tokens
    ids = tokenize_documents(tok, [text])
    assert len(ids) > tok.model_max_length
    assert "longer than the specified maximum" not in caplog.text
    tok(text)  # the plain call does warn, so the check above can fail
    assert "longer than the specified maximum" in caplog.text


def test_tokenize_requires_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(DataError, match="no eos token"):
        tokenize_documents(tok, ["a a"])


# ------------------------------------------------------------------------------ sources


def _paragraphs(n: int) -> list[str]:
    return [_words(i, n=80) for i in range(n)]


def test_txt_is_cut_at_blank_lines_and_split_stably(tmp_path):
    paras = _paragraphs(600)  # ~300k characters -> ~60 pieces
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    src = parse_source(str(path))
    docs = {s: list(src.documents(s)) for s in SPLITS}
    assert all(docs.values())
    pieces = [d for s in SPLITS for d in docs[s]]
    assert all(len(p) < sources.TXT_PIECE_CHARS + 1000 for p in pieces)
    # Pieces hold whole paragraphs, each exactly once across the three splits.
    got = sorted(p for piece in pieces for p in piece.split("\n\n"))
    assert got == sorted(paras)
    assert len(docs["train"]) > len(docs["validation"]) and len(docs["train"]) > len(docs["test"])
    again = parse_source(str(path))
    assert {s: list(again.documents(s)) for s in SPLITS} == docs
    assert again.fingerprint() == src.fingerprint()


def test_txt_without_blank_lines_is_still_cut(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(_paragraphs(1000)), encoding="utf-8")  # ~500k chars, no blank line
    pieces = [d for s in SPLITS for d in parse_source(str(path)).documents(s)]
    assert len(pieces) > 5 and max(map(len, pieces)) <= 4 * sources.TXT_PIECE_CHARS + 1000


def test_small_source_fills_train_first_then_names_the_fix(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just one short paragraph.\n", encoding="utf-8")
    src = parse_source(str(path))
    assert list(src.documents("train")) == ["Just one short paragraph."]
    with pytest.raises(DataError, match="add more text.*split files"):
        src.documents("validation")
    three = _write_jsonl(tmp_path / "three.jsonl", ["one", "two", "three"])
    src = parse_source(str(three))
    assert sorted(d for s in SPLITS for d in src.documents(s)) == ["one", "three", "two"]
    assert all(len(list(src.documents(s))) == 1 for s in SPLITS)


def test_hash_split_is_stable_when_files_are_added(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    texts = [_words(i) for i in range(300)]
    _write_jsonl(folder / "a.jsonl", texts)
    before = {s: set(parse_source(str(folder)).documents(s)) for s in SPLITS}
    assert all(before.values()) and set().union(*before.values()) == set(texts)
    assert sum(map(len, before.values())) == len(texts)  # disjoint
    assert 240 < len(before["train"]) < 295
    _write_jsonl(folder / "b.jsonl", [_words(i) for i in range(300, 400)])
    after = {s: set(parse_source(str(folder)).documents(s)) for s in SPLITS}
    for s in SPLITS:
        assert before[s] <= after[s]


def test_jsonl_xz_and_parquet_sources(tmp_path):
    texts = ["alpha doc", "beta doc", "", "gamma doc"]
    xz = tmp_path / "d.jsonl.xz"
    with lzma.open(xz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
    for name in ("d.jsonl.xz", "d.parquet"):
        src = parse_source(str(tmp_path / name))
        got = [d for s in SPLITS for d in src.documents(s)]  # 3 documents: one per split
        assert sorted(got) == ["alpha doc", "beta doc", "gamma doc"], name  # empty text skipped


def test_folder_with_split_files(tmp_path):
    (tmp_path / "train.txt").write_text("train para one\n\ntrain para two\n", encoding="utf-8")
    _write_jsonl(tmp_path / "valid.jsonl", ["val doc"])
    pq.write_table(pa.table({"text": ["test doc a", "test doc b"]}), tmp_path / "test.parquet")
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    src = parse_source(str(tmp_path))
    assert list(src.documents("train")) == ["train para one\n\ntrain para two"]
    assert list(src.documents("validation")) == ["val doc"]
    assert list(src.documents("test")) == ["test doc a", "test doc b"]
    (tmp_path / "test.parquet").unlink()
    with pytest.raises(DataError, match="none for test"):
        parse_source(str(tmp_path)).documents("test")
    (tmp_path / "extra.txt").write_text("where does this go?", encoding="utf-8")
    with pytest.raises(DataError, match="mixes split files"):
        parse_source(str(tmp_path))


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "ok"\n', encoding="utf-8")
    src = parse_source(str(bad))  # parsing checks the path only
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        src.validate()
    notext = _write_jsonl(tmp_path / "notext.jsonl", ["fine"])
    with notext.open("a") as f:
        f.write(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r'notext\.jsonl, line 2: no "text" field \(found: body\)'):
        parse_source(str(notext)).validate()
    nonstr = tmp_path / "nonstr.jsonl"
    nonstr.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1.*not a string"):
        list(parse_source(str(nonstr)).documents("train"))


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r'p\.parquet: no "text" column \(found: body\)'):
        parse_source(str(tmp_path / "p.parquet")).validate()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("corpus:shakespeare", "unknown corpus 'shakespeare'.*austen, moby_dick, sotu, all"),
        ("s3://bucket/data.jsonl", "unknown source scheme 's3'.*corpus:NAME"),
        ("/no/such/file.txt", "no such file or folder"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        parse_source(spec)


def test_bad_local_paths(tmp_path):
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unsupported file type"):
        parse_source(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="holds no"):
        parse_source(str(tmp_path))  # only a .csv inside


def test_hf_source_offline_names_the_fix(monkeypatch):
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match="cannot be reached.*local"):
        parse_source("hf:wikitext:wikitext-103-raw-v1")


def test_hf_split_names_and_carving(monkeypatch):
    import datasets

    rows = {"train": [_words(i) for i in range(400)] + [""], "valid": ["v1", "v2"], "test": ["t1"]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: [{"text": t} for t in rows[split]])
    full = sources.HFSource("hf:x", "x", None, ["train", "valid", "test"], None)
    assert list(full.documents("validation")) == ["v1", "v2"]
    assert list(full.documents("test")) == ["t1"]
    assert len(list(full.documents("train"))) == 400  # the empty row is skipped
    only_train = sources.HFSource("hf:y", "y", None, ["train"], None)
    carved = {s: set(only_train.documents(s)) for s in SPLITS}
    assert all(carved.values()) and sum(map(len, carved.values())) == 400
    assert set().union(*carved.values()) == set(rows["train"][:400])
    assert only_train.fingerprint() != full.fingerprint()
    no_test = sources.HFSource("hf:z", "z", None, ["validation"], None)
    with pytest.raises(DataError, match="no test"):
        no_test.documents("test")


def test_corpus_source_and_fingerprints(tmp_path):
    src = parse_source("corpus:moby_dick")
    assert list(src.documents("validation")) == [d.text for d in corpus_documents("moby_dick", "validation")]
    assert parse_source("corpus:all").fingerprint() != src.fingerprint()
    assert len(src.fingerprint()) == 64
    path = _write_jsonl(tmp_path / "x.jsonl", ["a"])
    before = parse_source(str(path)).fingerprint()
    _write_jsonl(path, ["a", "b"])
    assert parse_source(str(path)).fingerprint() != before


# ------------------------------------------------------------------------------ prepare


def _bins(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


def test_prepare_writes_shards_and_meta_then_reuses(tmp_path, gpt2_tokenizer, capsys):
    data = _write_jsonl(tmp_path / "docs.jsonl", [_words(i) for i in range(120)])
    out = tmp_path / "prepared"
    prep = prepare(gpt2_tokenizer, [str(data)], out, tokenizer_name="gpt2")
    assert not prep.reused and sorted(prep.splits) == sorted(SPLITS)
    assert (prep.vocab_size, prep.eos_token_id) == (50257, 50256)
    assert prep.fingerprint == tokenizer_fingerprint(gpt2_tokenizer)
    src = parse_source(str(data))
    for split in SPLITS:
        toks = prep.tokens(split)
        assert toks.dtype == np.uint16 and len(toks) == prep.splits[split] > 0
        np.testing.assert_array_equal(toks, tokenize_documents(gpt2_tokenizer, src.documents(split)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["vocab_size"] == 50257
    assert meta["sources"] == [{"spec": str(data), "fingerprint": src.fingerprint()}]
    assert sum(meta["splits"][s]["documents"] for s in SPLITS) == 120
    assert meta["splits"]["train"]["by_source"][str(data)]["tokens"] == prep.splits["train"]
    assert "prepare train" in capsys.readouterr().out

    stamps = _bins(out)
    again = prepare(gpt2_tokenizer, [str(data)], out, tokenizer_name="gpt2")
    assert again.reused and again.splits == prep.splits
    assert _bins(out) == stamps  # nothing rewritten
    loaded = load_prepared(out)
    assert loaded.splits == prep.splits and loaded.fingerprint == prep.fingerprint

    _write_jsonl(data, [_words(i) for i in range(150)])  # the source changes
    changed = prepare(gpt2_tokenizer, [str(data)], out)
    assert not changed.reused and sum(changed.splits.values()) > sum(prep.splits.values())
    assert "different inputs" in capsys.readouterr().out


def test_prepare_rebuilds_for_other_tokenizer_or_corrupt_shard(tmp_path, gpt2_tokenizer, tiny_tokenizer):
    data = _write_jsonl(tmp_path / "docs.jsonl", [_words(i) for i in range(60)])
    out = tmp_path / "out"
    prepare(tiny_tokenizer, [str(data)], out, splits=("train", "validation"))
    assert not (out / "test.bin").exists()
    prep = prepare(gpt2_tokenizer, [str(data)], out, splits=("train", "validation"))
    assert not prep.reused and prep.vocab_size == 50257
    os.truncate(out / "validation.bin", (out / "validation.bin").stat().st_size - 2)
    with pytest.raises(ShardError, match="validation.bin.*truncated"):
        load_prepared(out)
    assert not prepare(gpt2_tokenizer, [str(data)], out, splits=("train", "validation")).reused
    assert load_prepared(out).splits == prep.splits


def test_prepare_two_sources_and_errors_before_work(tmp_path, tiny_tokenizer):
    a = _write_jsonl(tmp_path / "a.jsonl", [_words(i) for i in range(40)])
    prep = prepare(tiny_tokenizer, ["corpus:moby_dick", str(a)], tmp_path / "out", splits=("validation",))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    by_source = meta["splits"]["validation"]["by_source"]
    assert set(by_source) == {"corpus:moby_dick", str(a)}
    assert sum(v["tokens"] for v in by_source.values()) == prep.splits["validation"]
    assert by_source["corpus:moby_dick"]["documents"] == 10
    with pytest.raises(DataError, match="no 'test' split"):
        prep.tokens("test")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only one paragraph\n")
    with pytest.raises(DataError, match="add more text"):
        prepare(tiny_tokenizer, [str(tiny)], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # failed before writing anything


def test_load_prepared_missing(tmp_path):
    with pytest.raises(DataError, match="run lmdistill prepare --out"):
        load_prepared(tmp_path)


# ------------------------------------------------------------------------------ sampler


def _batches(sampler: BlockSampler, tokens: np.ndarray, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch(tokens) for _ in range(n)]


def test_sampler_blocks_labels_and_epochs():
    tokens = np.arange(101, dtype=np.uint16)  # 10 blocks of 10 (+1)
    s = BlockSampler(len(tokens), block_size=10, batch_size=4, seed=0)
    assert s.tokens_per_batch == 40 and s.epoch == 0
    x, y = s.next_batch(tokens)
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # labels: the same window shifted by one
    assert torch.all(x[:, 0] % 10 == 0)  # blocks start at multiples of block_size
    starts = x[:, 0].tolist()
    x, _ = s.next_batch(tokens)
    starts += x[:, 0].tolist()
    x, _ = s.next_batch(tokens)  # 2 blocks from epoch 0, 2 from epoch 1
    assert s.epoch == 1
    starts += x[:2, 0].tolist()
    assert sorted(starts) == list(range(0, 100, 10))  # every block once per epoch


def test_sampler_deterministic_and_seeded():
    tokens = np.random.default_rng(1).integers(0, 1000, 5000).astype(np.uint32)
    a = _batches(BlockSampler(len(tokens), 16, 8, seed=3), tokens, 5)
    b = _batches(BlockSampler(len(tokens), 16, 8, seed=3), tokens, 5)
    c = _batches(BlockSampler(len(tokens), 16, 8, seed=4), tokens, 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_sampler_resume_gives_identical_batches():
    tokens = np.random.default_rng(2).integers(0, 1000, 3000).astype(np.uint16)
    ref = BlockSampler(len(tokens), 32, 5, seed=7)
    _batches(ref, tokens, 12)  # crosses an epoch (93 blocks / 5 per batch)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    resumed = BlockSampler(len(tokens), 32, 5, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == ref.epoch
    for (x1, y1), (x2, y2) in zip(_batches(ref, tokens, 30), _batches(resumed, tokens, 30)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="block_size"):
        BlockSampler(len(tokens), 16, 5, seed=7).load_state_dict(state)


def test_sampler_ranks_are_disjoint_and_equal():
    tokens = np.arange(20 * 8 + 1 + 8, dtype=np.uint32)  # 21 blocks of 8 -> 10 per rank, 1 dropped
    per_rank = []
    for rank in range(2):
        s = BlockSampler(len(tokens), 8, 5, seed=11, rank=rank, world_size=2)
        assert s.blocks_per_epoch == 10
        starts = [int(v) for _ in range(2) for v in s.next_batch(tokens)[0][:, 0]]
        assert s.epoch == 1
        per_rank.append(set(starts))
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert not per_rank[0] & per_rank[1]


def test_sampler_too_short_data():
    with pytest.raises(DataError, match="smaller block size"):
        BlockSampler(num_tokens=64, block_size=64, batch_size=1, seed=0)
    BlockSampler(num_tokens=65, block_size=64, batch_size=1, seed=0)  # exactly one block
    with pytest.raises(DataError, match="more data"):
        BlockSampler(num_tokens=65, block_size=64, batch_size=1, seed=0, world_size=2)
    s = BlockSampler(num_tokens=65, block_size=64, batch_size=1, seed=0)
    with pytest.raises(DataError, match="same split"):
        s.next_batch(np.zeros(100, dtype=np.uint16))


def _epoch_starts(sampler: BlockSampler, tokens: np.ndarray) -> list[int]:
    starts = []
    while len(starts) < sampler.blocks_per_epoch:
        starts += sampler.next_batch(tokens)[0][:, 0].tolist()
    return starts[: sampler.blocks_per_epoch]


def test_sampler_repeats_weigh_each_source_per_epoch():
    # Three sources of 40, 25 and 36 tokens in one stream of 101: blocks of 10 start at tokens 0..90,
    # so blocks 0-3 are the first source's, 4-6 the second's (40, 50, 60) and 7-9 the third's.
    tokens = np.arange(101, dtype=np.uint32)
    ones = BlockSampler(len(tokens), 10, 3, seed=5, repeats=[(40, 1), (25, 1), (36, 1)])
    assert _epoch_starts(ones, tokens) == _epoch_starts(BlockSampler(len(tokens), 10, 3, seed=5), tokens)
    weighted = BlockSampler(len(tokens), 10, 4, seed=5, repeats=[(40, 2), (25, 1), (36, 1 / 3)])
    assert weighted.epoch_size == 8 + 3 + 1
    for epoch in range(3):
        starts = _epoch_starts(weighted, tokens)
        counts = np.bincount(np.array(starts) // 10, minlength=10)
        assert counts[:4].tolist() == [2, 2, 2, 2] and counts[4:7].tolist() == [1, 1, 1]
        assert counts[7:].sum() == 1  # a third of the last source's 3 blocks, drawn afresh each epoch
    # Resuming mid-epoch gives the same blocks; other repeats are refused.
    state = json.loads(json.dumps(weighted.state_dict()))
    twin = BlockSampler(len(tokens), 10, 4, seed=5, repeats=[(40, 2), (25, 1), (36, 1 / 3)])
    twin.load_state_dict(state)
    for (x1, _), (x2, _) in zip(_batches(weighted, tokens, 7), _batches(twin, tokens, 7)):
        assert torch.equal(x1, x2)
    with pytest.raises(DataError, match="same data.repeats"):
        BlockSampler(len(tokens), 10, 4, seed=5, repeats=[(40, 1), (25, 1), (36, 1)]).load_state_dict(state)
    with pytest.raises(DataError, match="prepare the data again"):
        BlockSampler(len(tokens), 10, 4, seed=5, repeats=[(40, 1), (25, 1)])
