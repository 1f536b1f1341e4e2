"""Task specs on the command line: parsing, options and early errors."""

from __future__ import annotations

import pytest

from lmdistill.data.corpora import corpus_documents
from lmdistill.evaluate.tasks import PerplexityTask, TaskError, parse_tasks


def test_ppl_corpus_all_expands_per_corpus():
    tasks = parse_tasks("ppl:corpus=all:split=validation:window=256")
    assert [t.label for t in tasks] == ["ppl austen", "ppl moby_dick", "ppl sotu"]
    assert all(isinstance(t, PerplexityTask) and t.split == "validation" for t in tasks)
    tasks[0].load()
    assert tasks[0].protocol_.window == 256 and "validation split of corpus:austen" in tasks[0].protocol()


def test_option_values_may_hold_colons():
    (task,) = parse_tasks("ppl:source=hf:wikitext:wikitext-2-raw-v1:split=test")
    assert task.source == "hf:wikitext:wikitext-2-raw-v1" and task.split == "test"


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown task 'nope'"),
    ("ppl", "exactly one of corpus"),
    ("ppl:corpus=austen:source=x.txt", "exactly one of corpus"),
    ("ppl:corpus=austen:colour=red", "no option"),
    ("ppl::corpus=austen", "key=value"),
    ("ppl:corpus=austen:oops", "austen:oops"),  # not an option: part of the value, an unknown corpus
    ("lambada", "needs path="),
    ("lambada:path=/nonexistent/lambada.jsonl", "does not exist"),
    ("hellaswag:path=/nonexistent/hellaswag.jsonl", "does not exist"),
    ("wikitext:path=/nonexistent/wikitext-2-raw", "does not exist"),
])
def test_bad_task_specs_fail_before_any_model(spec, message):
    with pytest.raises(ValueError, match=message):  # TaskError, or DataError for a bad source
        for task in parse_tasks(spec):
            task.load()


def test_bad_option_value_names_the_option():
    (task,) = parse_tasks("ppl:corpus=austen:window=big")
    with pytest.raises(TaskError, match="window='big'"):
        task.load()


def test_rolling_task_on_a_bundled_corpus():
    tasks = parse_tasks("rolling:corpus=all:split=validation:max_docs=2")
    assert [t.label for t in tasks] == ["rolling austen", "rolling moby_dick", "rolling sotu"]
    tasks[1].load()
    assert tasks[1].docs == [d.text for d in corpus_documents("moby_dick", "validation")[:2]]
    assert "rolling log-likelihood per document (2 documents" in tasks[1].protocol()
    with pytest.raises(TaskError, match="exactly one of corpus"):
        parse_tasks("rolling:split=test")


def test_wikitext_without_path_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (task,) = parse_tasks("wikitext:variant=103")
    with pytest.raises(TaskError, match="needs path=DIR"):
        task.load()
