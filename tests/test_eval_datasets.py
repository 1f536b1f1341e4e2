"""lmdistill.evaluate.datasets and .lastword: benchmark readers on hand-written fixtures in the
official formats (WikiText raw + HF parquet, PTB, enwik8/text8, LAMBADA, HellaSwag) and the
shipped last-word set."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmdistill.data.corpora import CORPORA, corpus_documents
from lmdistill.data.errors import DataError
from lmdistill.evaluate import lastword
from lmdistill.evaluate.datasets import (
    byte_corpus,
    ptb_detokenizer,
    ptb_documents,
    read_hellaswag,
    read_lambada,
    wikitext_detokenizer,
    wikitext_documents,
)

# ---------------------------------------------------------------------------------- WikiText

# The official raw layout: every line starts with a space, blank lines are " ", the file
# starts with a blank line, level-1 headings " = Title = " start articles, deeper ones do not.
WIKI_RAW = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n"
    " \n"
    " = = Gameplay = = \n"
    " \n"
    " The game 's battle system , the BliTZ system , is carried over . \n"
    " \n"
    " = = = Plot = = = \n"
    " It costs 1 @,@ 000 yen ( about $ 10 ) and weighs 3 @.@ 5 kg . \n"
    " \n"
    " = Tower Building of the Little Rock Arsenal = \n"
    " \n"
    " The building was built in 1840 . \n"
    " \n"
)
ART1 = WIKI_RAW[WIKI_RAW.index(" = Valkyria") : WIKI_RAW.index(" = Tower")][:-1]  # "\n"-joined lines
ART2 = WIKI_RAW[WIKI_RAW.index(" = Tower") :]  # the last page keeps the file's final "\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_wikitext_raw_folder_splits_articles_like_wikitext_document_level(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    _write(folder / "wiki.test.raw", WIKI_RAW)
    _write(folder / "wiki.valid.raw", " \n = Only = \n \n Text . \n")
    pages = wikitext_documents(folder, "test")
    assert pages == [ART1, ART2]
    assert pages[0].startswith(" = Valkyria Chronicles III = \n \n Senjō")  # leading blank line dropped
    assert " = = Gameplay = = " in pages[0] and " = = = Plot = = = " in pages[0]  # level 2/3 stay inside
    assert wikitext_documents(folder, "validation") == [" = Only = \n \n Text . \n"]
    assert wikitext_documents(folder, "valid") == wikitext_documents(folder, "validation")
    assert wikitext_documents(folder / "wiki.test.raw") == pages  # a single file


def test_wikitext_edge_cases(tmp_path):
    # No heading at all: one page; CRLF files read with universal newlines; text before the
    # first heading that is not blank is its own page.
    assert wikitext_documents(_write(tmp_path / "a.raw", " no heading here \n")) == [" no heading here \n"]
    (tmp_path / "crlf.raw").write_bytes(WIKI_RAW.replace("\n", "\r\n").encode())
    assert wikitext_documents(tmp_path / "crlf.raw") == [ART1, ART2]
    assert wikitext_documents(_write(tmp_path / "b.raw", " preface \n = T = \n x \n")) == [" preface ", " = T = \n x \n"]
    # Empty lines between articles and a file that ends with a heading.
    assert wikitext_documents(_write(tmp_path / "c.raw", "\n\n = A = \n\n = B = ")) == [" = A = \n", " = B = "]


def test_wikitext_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"empty.raw: empty"):
        wikitext_documents(_write(tmp_path / "empty.raw", " \n \n"))
    with pytest.raises(DataError, match=r"wiki\.test\.raw.*test-\*\.parquet"):
        wikitext_documents(tmp_path, "test")
    with pytest.raises(DataError, match="unknown split"):
        wikitext_documents(tmp_path, "dev2")
    (tmp_path / "bad.raw").write_bytes(b" = A = \n ok \n \xff\xfe \n")
    with pytest.raises(DataError, match=r"bad\.raw, line 3: not valid UTF-8"):
        wikitext_documents(tmp_path / "bad.raw")


def test_wikitext_hf_parquet_layouts_match_the_raw_file(tmp_path):
    # Salesforce/wikitext: one row per line with its "\n"; blank lines stored as "".
    lines = WIKI_RAW.splitlines(keepends=True)
    rows = [line if line.strip() else "" for line in lines]
    folder = tmp_path / "wikitext-103-raw-v1"
    folder.mkdir()
    pq.write_table(pa.table({"text": rows[:7]}), folder / "test-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": rows[7:]}), folder / "test-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": [" = V = \n", " v \n"]}), folder / "validation-00000-of-00001.parquet")
    assert wikitext_documents(folder, "test") == [ART1, ART2]
    assert wikitext_documents(folder, "validation") == [" = V = \n v \n"]
    # EleutherAI/wikitext_document_level's own export: column "page", one article a row.
    doc_level = tmp_path / "wikitext-2-raw-v1"
    doc_level.mkdir()
    pq.write_table(pa.table({"page": [ART1, ART2]}), doc_level / "wikitext-2-raw-v1-test.parquet")
    assert wikitext_documents(doc_level, "test") == [ART1, ART2]
    pq.write_table(pa.table({"words": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"other\.parquet: no 'page' or 'text' column \(found: words\)"):
        wikitext_documents(tmp_path / "other.parquet")


def test_wikitext_detokenizer_matches_lm_eval_harness():
    # Expected outputs of lm_eval 0.4.13 tasks/wikitext/preprocess_wikitext.py on the same
    # text (checked against it; also fuzzed: identical on 20,000 random token strings).
    assert wikitext_detokenizer(ART1) == (
        " = Valkyria Chronicles III =\n\nSenjō no Valkyria 3: Unrecorded Chronicles is a tactical "
        "role-playing video game.\n\n== Gameplay ==\n\nThe game's battle system, the BliTZ system, is "
        "carried over.\n\n=== Plot ===\nIt costs 1,000 yen (about $ 10) and weighs 3.5 kg.\n"
    )
    assert wikitext_detokenizer(" the players ' club won N to N . ") == " the players' club won 1 to N. "
    assert wikitext_detokenizer(' he said " hello there " , 20 ° C ') == ' he said "hello there", 20°C '
    assert wikitext_detokenizer(" = = = = Deep = = = = \n") == " ==== Deep ====\n"  # leading space kept


# -------------------------------------------------------------------------------------- PTB

PTB_TEST = (
    " no it was n't black monday \n"
    " but while the new york stock exchange did n't fall apart friday \n"
    "\n"
    " mr. <unk> is chairman of <unk> n.v. the dutch publishing group \n"
    " it 's $ N billion and they 're up N N \n"
)


def test_ptb_split_is_one_document(tmp_path):
    folder = tmp_path / "simple-examples" / "data"
    _write(folder / "ptb.test.txt", PTB_TEST)
    _write(folder / "ptb.valid.txt", " consumers may want to move their telephones a little closer to the tv set \n")
    docs = ptb_documents(folder, "test")
    assert docs == [
        "no it was n't black monday\n"
        "but while the new york stock exchange did n't fall apart friday\n"
        "mr. <unk> is chairman of <unk> n.v. the dutch publishing group\n"
        "it 's $ N billion and they 're up N N"
    ]
    assert ptb_documents(folder, "validation")[0].startswith("consumers may want")
    assert ptb_documents(folder / "ptb.test.txt") == docs
    pq.write_table(pa.table({"sentence": [line.strip() for line in PTB_TEST.splitlines()]}),
                   tmp_path / "test-00000-of-00001.parquet")
    assert ptb_documents(tmp_path, "test") == docs  # ptb_text_only parquet, column "sentence"
    with pytest.raises(DataError, match=r"ptb\.train\.txt"):
        ptb_documents(folder, "train")
    with pytest.raises(DataError, match="empty"):
        ptb_documents(_write(tmp_path / "blank.txt", "\n \n"))


def test_ptb_detokenizer_rejoins_clitics_only():
    assert ptb_detokenizer(" no it was n't black monday \n it 's $ N billion and they 're up N N ") == (
        "no it wasn't black monday\nit's $ N billion and they're up N N"
    )
    assert ptb_detokenizer("i 'm sure we 've seen he 'd say you 'll <unk>") == "i'm sure we've seen he'd say you'll <unk>"


# ------------------------------------------------------------------------------ enwik8/text8


def test_enwik8_standard_split_boundaries(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:  # a sparse 10^8-byte file with markers at the boundaries
        f.truncate(100_000_000)
        for at, byte in ((0, b"A"), (89_999_999, b"B"), (90_000_000, b"C"), (94_999_999, b"D"),
                         (95_000_000, b"E"), (99_999_999, b"F")):
            f.seek(at)
            f.write(byte)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the standard size does not warn
        train = byte_corpus(path, "train")
        valid = byte_corpus(tmp_path, "validation")  # a folder holding enwik8
        test = byte_corpus(path, "test")
    assert (len(train), len(valid), len(test)) == (90_000_000, 5_000_000, 5_000_000)
    assert train[:1] == b"A" and train[-1:] == b"B"
    assert valid[:1] == b"C" and valid[-1:] == b"D"
    assert test[:1] == b"E" and test[-1:] == b"F"


def test_byte_corpus_small_file_proportional_split_with_warning(tmp_path):
    data = bytes(range(256)) * 4  # 1024 bytes: 921 / 51 / 52
    path = tmp_path / "enwik8"
    path.write_bytes(data)
    with pytest.warns(UserWarning, match="not the 100,000,000"):
        parts = [byte_corpus(path, s) for s in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [921, 51, 52]
    assert b"".join(parts) == data
    assert parts[1] == data[921:972]
    # enwik8.zip as distributed: member "enwik8".
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    with pytest.warns(UserWarning):
        assert byte_corpus(tmp_path / "enwik8.zip", "test") == parts[2]


def test_text8_zip(tmp_path):
    text = (b"anarchism originated as a term of abuse first used against early working class radicals " * 20)[:1000]
    with zipfile.ZipFile(tmp_path / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    with pytest.warns(UserWarning):
        assert byte_corpus(tmp_path / "text8.zip", "test", name="text8") == text[950:]
    with pytest.warns(UserWarning):
        assert byte_corpus(tmp_path, "train", name="text8") == text[:900]  # folder with text8.zip
    with zipfile.ZipFile(tmp_path / "wrong.zip", "w") as zf:
        zf.writestr("a", b"x")
        zf.writestr("b", b"y")
    with pytest.raises(DataError, match=r"wrong\.zip: zip has no member 'text8' \(found: a, b\)"):
        byte_corpus(tmp_path / "wrong.zip", name="text8")
    (tmp_path / "upper").write_bytes(b"abc Def")
    with pytest.raises(DataError, match=r"byte 4 is b'D'; text8 holds only a-z"), pytest.warns(UserWarning):
        byte_corpus(tmp_path / "upper", name="text8")
    with pytest.raises(DataError, match="unknown byte corpus"):
        byte_corpus(tmp_path / "upper", name="enwik9")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds neither enwik8 nor enwik8.zip"):
        byte_corpus(tmp_path / "nothing")
    with pytest.raises(DataError, match="no such file"):
        byte_corpus(tmp_path / "missing")


# ----------------------------------------------------------------------------------- LAMBADA


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_read_lambada(tmp_path):
    rows = [
        {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. "
                 "A guardian angel. \"Figured if you're going to be out at night getting hit by cars, "
                 "you might as well have a guardian angel"},
        {"text": "she left the room and closed the door behind her", "domain": None},
    ]
    path = _jsonl(tmp_path / "lambada_test.jsonl", [rows[0], "", rows[1], "  "])  # blank lines skipped
    got = read_lambada(path)
    assert got == rows
    context, target = got[0]["text"].rsplit(" ", 1)
    assert target == "angel" and context.endswith("have a guardian")


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([{"text": "a b"}, {"txt": "a b"}], r"line 2: no \"text\" field \(found: txt\)"),
        ([{"text": "a b"}, "", "{not json"], r"line 3: not valid JSON"),
        ([["text", "a b"]], r"line 1: a JSON list, not an object"),
        ([{"text": 5}], r"line 1: \"text\" is int"),
        ([{"text": "single"}], r"line 1: \"text\" must be a context and a final target word"),
        ([{"text": "ends with space "}], r"line 1: \"text\" must be"),
        ([{"text": ""}], r"line 1: \"text\" must be"),
        (["", "   "], r"empty \(no JSON lines\)"),
    ],
)
def test_read_lambada_errors_name_file_and_line(tmp_path, lines, pattern):
    path = _jsonl(tmp_path / "lambada_test.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + pattern):
        read_lambada(path)


# --------------------------------------------------------------------------------- HellaSwag

HS = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "split": "val",
    "split_type": "indomain",
    "label": 3,
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


def test_read_hellaswag(tmp_path):
    hf_style = {**HS, "ind": 25, "label": "0", "ctx_b": ""}  # Rowan/hellaswag stores labels as strings
    got = read_hellaswag(_jsonl(tmp_path / "hellaswag_val.jsonl", [HS, "", hf_style]))
    assert got[0] == HS
    assert got[1]["label"] == 0 and isinstance(got[1]["label"], int) and got[1]["ctx_b"] == ""
    assert got[1]["source_id"] == HS["source_id"]  # other fields kept


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({**HS, "label": 4}, r"\"label\" 4 is out of range for 4 endings \(0..3\)"),
        ({**HS, "label": -1}, r"\"label\" -1 is out of range"),
        ({**HS, "label": "7"}, r"\"label\" 7 is out of range"),
        ({**HS, "label": "x"}, r"\"label\" is \"x\", not an integer"),
        ({**HS, "label": True}, r"\"label\" is true, not an integer"),
        ({k: v for k, v in HS.items() if k != "endings"}, r"missing field\(s\) endings"),
        ({k: v for k, v in HS.items() if k != "label"}, r"missing field\(s\) label \(the official test file has no labels"),
        ({k: v for k, v in HS.items() if k not in ("ctx_a", "ctx")}, r"missing field\(s\) ctx_a, ctx;"),
        ({**HS, "endings": ["only one"], "label": 0}, r"\"endings\" must be a list of at least 2 strings"),
        ({**HS, "endings": "abcd"}, r"\"endings\" must be a list"),
        ({**HS, "endings": ["a", 2]}, r"\"endings\" must be a list"),
        ({**HS, "ctx": None}, r"\"ctx\" is NoneType, not a string"),
    ],
)
def test_read_hellaswag_errors_name_file_and_line(tmp_path, row, pattern):
    path = _jsonl(tmp_path / "hellaswag_val.jsonl", [HS, row])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + pattern):
        read_hellaswag(path)


def test_read_hellaswag_empty_or_not_json(tmp_path):
    with pytest.raises(DataError, match=r"hellaswag_val\.jsonl: empty"):
        read_hellaswag(_write(tmp_path / "hellaswag_val.jsonl", ""))
    with pytest.raises(DataError, match=r"h\.jsonl, line 1: not valid JSON"):
        read_hellaswag(_write(tmp_path / "h.jsonl", "ctx_a,ctx_b\n"))
    with pytest.raises(DataError, match="no such file"):
        read_hellaswag(tmp_path / "missing.jsonl")


# -------------------------------------------------------------------------- last-word set


@pytest.fixture(scope="module")
def test_docs():
    """The bundled test split, read once for this module (decompressing takes seconds)."""
    return {name: corpus_documents(name, "test") for name in CORPORA}


@pytest.fixture(scope="module")
def built(test_docs):
    with mock.patch.object(lastword, "corpus_documents", lambda name, split: test_docs[name]):
        return lastword.build_lastword()


def test_shipped_lastword_file_equals_build_output(built):
    path = lastword.lastword_path()
    assert path.is_file(), "run python scripts/build_lastword.py"
    assert path.stat().st_size < 300_000
    assert path.read_text(encoding="utf-8") == lastword.to_jsonl(built), (
        "lastword_test.jsonl is stale; run python scripts/build_lastword.py"
    )
    assert lastword.load_lastword() == built


def test_lastword_rows_are_sentence_final_words_of_the_test_split(built, test_docs):
    assert [sum(r["corpus"] == c for r in built) for c in CORPORA] == [100, 100, 100]
    assert len({r["text"] for r in built}) == len(built)
    normalised = {(c, d.id): " ".join(d.text.split()) for c in CORPORA for d in test_docs[c]}
    for row in built:
        assert set(row) == {"text", "corpus", "doc_id"}
        context, target = row["text"].rsplit(" ", 1)
        assert target.isascii() and target.isalpha() and len(target) >= 3
        assert 59 <= len(context.split(" ")) <= 119
        doc = normalised[(row["corpus"], row["doc_id"])]
        # The passage occurs in its document, its target followed by a sentence end.
        assert re.search(re.escape(row["text"]) + r"[^\w\s]*[.!?](\s|$)", doc), row


def test_lastword_construction_rules(test_docs):
    sentences = lastword._sentences(
        'Mr. Elliot met Dr. W. Smith in the U.S. last year. "Really?" she asked! Was it at 5 p.m. today? Yes. No. tail. trailing words'
    )
    assert [" ".join(s) for s in sentences] == [
        "Mr. Elliot met Dr. W. Smith in the U.S. last year.",
        '"Really?" she asked!',
        "Was it at 5 p.m. today?",
        "Yes.",
    ]  # "tail." before a lower-case word ends no sentence; words after the last end are dropped
    assert lastword._target("year.") == "year" and lastword._target("asked!\"") == "asked"
    assert lastword._target("Yes.") == "Yes" and lastword._target("it.") is None and lastword._target("5.") is None
    with mock.patch.object(lastword, "corpus_documents", lambda name, split: test_docs[name]):
        other = lastword.build_lastword(min_words=20, max_words=40, per_corpus=5, seed=1)
        again = lastword.build_lastword(min_words=20, max_words=40, per_corpus=5, seed=1)
        seed2 = lastword.build_lastword(min_words=20, max_words=40, per_corpus=5, seed=2)
    assert other == again and other != seed2 and len(other) == 15
    assert all(19 <= len(r["text"].split(" ")) <= 40 for r in other)
