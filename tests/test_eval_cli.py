"""`lmdistill eval` with every task on small fixtures in the official formats, end to end."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.evaluate import hellaswag, lambada
from lmdistill.evaluate.datasets import read_hellaswag, read_lambada, wikitext_detokenizer, wikitext_documents
from lmdistill.evaluate.rolling import score_documents
from lmdistill.models.load import load_model, load_tokenizer

from .helpers import save_with_tokenizer, tiny_gpt2

FIXTURES = Path(__file__).parent / "lm_eval_tasks" / "fixtures"


@pytest.fixture(scope="module")
def data(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("evaldata")
    pages = [json.loads(line)["page"] for line in (FIXTURES / "wikitext.jsonl").read_text().splitlines() if line.strip()]
    wikitext = root / "wikitext-2-raw"
    wikitext.mkdir()
    (wikitext / "wiki.test.raw").write_text(" \n" + "".join(pages))
    ptb = root / "ptb"
    ptb.mkdir()
    (ptb / "ptb.test.txt").write_text(" the company said it expects N new orders \n mr. <unk> is n't sure \n")
    text8 = root / "text8.zip"
    with zipfile.ZipFile(text8, "w") as zf:
        zf.writestr("text8", ("the quick brown fox jumps over the lazy dog " * 40).strip())
    return {
        "teacher": save_with_tokenizer(tiny_gpt2(n_layer=2, seed=1), gpt2_tokenizer, root / "teacher"),
        "student": save_with_tokenizer(tiny_gpt2(n_layer=1, seed=2), gpt2_tokenizer, root / "student"),
        "wikitext": wikitext, "pages": pages, "ptb": ptb, "text8": text8,
        "lambada": FIXTURES / "lambada_openai.jsonl", "hellaswag": FIXTURES / "hellaswag.jsonl",
    }


def test_every_task_side_by_side(capsys, data, tmp_path):
    report = tmp_path / "eval.json"
    tasks = [
        f"wikitext:path={data['wikitext']}", f"ptb:path={data['ptb']}", f"text8:path={data['text8']}",
        f"lambada:path={data['lambada']}", f"hellaswag:path={data['hellaswag']}", "lastword:max_docs=6",
        "ppl:corpus=moby_dick:window=64:max_tokens=300",
    ]
    with pytest.warns(UserWarning):  # the text8 fixture is not 10^8 bytes: proportional split
        rc = main(["eval", str(data["teacher"]), str(data["student"]), *[a for t in tasks for a in ("--task", t)],
                   "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    results = json.loads(report.read_text())
    labels = [t["label"] for t in results["tasks"]]
    summary = out.split("### summary", 1)[1].split("###", 1)[0]
    assert "wikitext word_perplexity" in summary and "hellaswag acc" in summary and "lastword acc" in summary
    assert len([line for line in summary.splitlines() if line.startswith("| ") and "model" not in line]) == 2
    assert labels == ["wikitext", "ptb", "text8", "lambada", "hellaswag", "lastword", "ppl moby_dick"]
    for task in results["tasks"]:
        assert f"### {task['label']}" in out and task["protocol"] in out
        for row in results["models"]:
            for metric in task["metrics"]:
                value = row["tasks"][task["label"]][metric]
                assert math.isfinite(value)
                if metric.startswith("acc") or metric.endswith("_acc"):
                    assert 0 <= value <= 1

    # The table holds what the library computes directly for the same model and data.
    model, tok = load_model(data["teacher"]), load_tokenizer(data["teacher"])
    teacher_row = results["models"][0]["tasks"]
    documents = wikitext_documents(data["wikitext"], "test")
    assert len(documents) == len(data["pages"]) == 3
    direct = score_documents(model, tok, documents, detokenize=wikitext_detokenizer)
    assert teacher_row["wikitext"]["word_perplexity"] == pytest.approx(direct.word_perplexity, rel=1e-9)
    assert teacher_row["wikitext"]["documents"] == len(data["pages"])
    assert teacher_row["lambada"]["acc"] == lambada.score(model, tok, read_lambada(data["lambada"]))["acc"]
    direct_hs = hellaswag.score(model, tok, read_hellaswag(data["hellaswag"]))
    assert (teacher_row["hellaswag"]["acc"], teacher_row["hellaswag"]["acc_norm"]) == (direct_hs["acc"], direct_hs["acc_norm"])
    # text8: bits per character over the raw bytes of the test split.
    assert teacher_row["text8"]["bits_per_byte"] == pytest.approx(
        -teacher_row["text8"]["loglikelihood"] / teacher_row["text8"]["bytes"] / math.log(2))


def test_malformed_benchmark_file_is_a_clean_error(capsys, data, tmp_path):
    bad = tmp_path / "hellaswag.jsonl"
    bad.write_text('{"ctx_a": "x", "ctx_b": "y", "ctx": "x y", "endings": ["a", "b"], "label": 5, "activity_label": "z"}\n')
    rc = main(["eval", str(data["teacher"]), "--task", f"hellaswag:path={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "line 1" in err and "label" in err
