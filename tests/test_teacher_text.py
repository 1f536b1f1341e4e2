"""lmdistill generate-corpus: the teacher's samples, seeded per batch, resumable, read back as a source."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from lmdistill import teacher_text
from lmdistill.data.sources import parse_source
from lmdistill.teacher_text import TeacherTextError, TextSettings, sample_next, sample_rows, write_corpus

from .helpers import save_with_tokenizer, small_text_file, softmax64, tiny_gpt2


def nucleus64(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The nucleus distribution in float64, as its definition says: sort by probability, keep the
    smallest prefix whose mass reaches top_p, renormalise."""
    p = softmax64(logits, temperature)
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    kept = np.zeros_like(p)
    kept[order[before < top_p]] = p[order[before < top_p]]
    return kept / kept.sum(), np.min(np.abs(before - top_p))


@pytest.mark.parametrize("top_p, candidates", [(1.0, 1024), (0.8, 1024), (0.8, 3)])
def test_sampled_frequencies_follow_the_nucleus(monkeypatch, top_p, candidates):
    # candidates=3: the nucleus holds more tokens than the top-k looked at first, so the rows take
    # the full-sort path.
    monkeypatch.setattr(teacher_text, "NUCLEUS_CANDIDATES", candidates)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=40)
    want, margin = nucleus64(logits, 0.7, top_p)
    assert top_p == 1.0 or margin > 1e-4  # no token sits at the nucleus edge within float32 rounding
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor(logits, dtype=torch.float32).expand(5000, -1)
    draws = torch.cat([sample_next(rows, 0.7, top_p, generator) for _ in range(8)]).numpy()
    n = len(draws)
    freq = np.bincount(draws, minlength=40) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    if top_p < 1:
        assert len(np.flatnonzero(want)) > candidates or candidates > 40
    # Five standard errors of a binomial frequency: fails by chance with odds below 1e-5 a token.
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12)


def test_sampling_at_a_tiny_temperature_is_greedy_decoding():
    model = tiny_gpt2(n_layer=2, seed=3)
    prompts = torch.tensor([[10, 200, 3000, 7], [5, 6, 7, 8], [50256, 1, 2, 3]])
    settings = TextSettings(teacher="t", teacher_fingerprint="f", prompts="p", prompt_tokens=4, new_tokens=12,
                            batch_size=3, temperature=1e-6, top_p=1.0, seed=0, precision="fp32")
    sampled = sample_rows(model, prompts, settings, torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(sampled, greedy[:, 4:])


@pytest.fixture
def teacher(gpt2_tokenizer):
    return tiny_gpt2(n_layer=2, seed=1), gpt2_tokenizer


def settings_for(**changes) -> TextSettings:
    base = TextSettings(teacher="tiny", teacher_fingerprint="abc", prompts=None, prompt_tokens=1, new_tokens=24,
                        batch_size=3, temperature=1.0, top_p=0.95, seed=0, precision="fp32")
    return replace(base, **changes)


def corpus_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_corpus_grown_in_steps_equals_one_written_at_once(teacher, tmp_path):
    model, tokenizer = teacher
    end = {tokenizer.eos_token_id}
    settings = settings_for()
    total = write_corpus(model, tokenizer, tmp_path / "once", settings, 200, None, end, [tokenizer.eos_token_id])
    assert total >= 200
    write_corpus(model, tokenizer, tmp_path / "steps", settings, 50, None, end, [tokenizer.eos_token_id])
    assert len(list((tmp_path / "steps").glob("part-*.jsonl"))) < len(list((tmp_path / "once").glob("part-*.jsonl")))
    write_corpus(model, tokenizer, tmp_path / "steps", settings, 200, None, end, [tokenizer.eos_token_id])
    assert corpus_files(tmp_path / "steps") == corpus_files(tmp_path / "once")

    rows = [json.loads(line) for part in sorted((tmp_path / "once").glob("part-*.jsonl"))
            for line in part.read_text().splitlines()]
    assert sum(r["new_tokens"] for r in rows) == total
    for r in rows:  # the text is the tokens counted, with no end-of-document inside
        ids = tokenizer(r["text"])["input_ids"]
        assert tokenizer.eos_token_id not in ids and r["prompt"] == ""
        assert tokenizer.decode(ids) == r["text"]

    other = write_corpus(model, tokenizer, tmp_path / "seed1", settings_for(seed=1), 200, None, end,
                         [tokenizer.eos_token_id])
    assert other >= 200 and corpus_files(tmp_path / "seed1") != corpus_files(tmp_path / "once")


def test_prompts_are_windows_of_the_data_and_the_folder_reads_as_a_source(teacher, tmp_path):
    model, tokenizer = teacher
    data = np.arange(1000, 1400, dtype=np.uint32)  # distinct ids: a window is recognisable
    settings = settings_for(prompts="corpus:moby_dick", prompt_tokens=6)
    write_corpus(model, tokenizer, tmp_path / "c", settings, 60, data, {tokenizer.eos_token_id}, [0])
    rows = [json.loads(line) for line in (tmp_path / "c" / "part-00000.jsonl").read_text().splitlines()]
    for r in (r for r in rows if r["prompt"]):
        ids = tokenizer(r["prompt"])["input_ids"]
        assert len(ids) == 6 and ids == list(range(ids[0], ids[0] + 6))
    docs = [d for split in ("train", "validation", "test") for d in parse_source(str(tmp_path / "c")).documents(split)]
    assert sorted(docs) == sorted(r["text"] for r in rows if r["text"].strip())  # manifest.json is not a document


def test_other_settings_or_a_foreign_folder_are_refused(teacher, tmp_path):
    model, tokenizer = teacher
    write_corpus(model, tokenizer, tmp_path / "c", settings_for(), 30, None, {50256}, [50256])
    with pytest.raises(TeacherTextError, match="other settings .*top_p"):
        write_corpus(model, tokenizer, tmp_path / "c", settings_for(top_p=0.9), 60, None, {50256}, [50256])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TeacherTextError, match="not empty"):
        write_corpus(model, tokenizer, tmp_path / "other", settings_for(), 30, None, {50256}, [50256])
    with pytest.raises(TeacherTextError, match="top_p"):
        settings_for(top_p=0.0)


def run_cli(out, tokens: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmdistill", "generate-corpus", "--teacher", str(out.parent / "teacher"),
         "--tokens", str(tokens), "--out", str(out), "--batch-size", "2", "--new-tokens", "16", "--seed", "7",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_generate_corpus_continues_to_the_same_files(gpt2_tokenizer, tmp_path):
    save_with_tokenizer(tiny_gpt2(n_layer=2, seed=2), gpt2_tokenizer, tmp_path / "teacher")
    reference = run_cli(tmp_path / "reference", 1500)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    assert "fp32" in out or "bf16" in out

    killed = run_cli(tmp_path / "killed", 1500)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "part-00003.jsonl").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    parts = len(list((tmp_path / "killed").glob("part-*.jsonl")))
    assert parts < len(list((tmp_path / "reference").glob("part-*.jsonl")))
    resumed = run_cli(tmp_path / "killed", 1500)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert corpus_files(tmp_path / "killed") == corpus_files(tmp_path / "reference")


def test_cli_prompts_are_windows_of_the_source_text(gpt2_tokenizer, tmp_path):
    save_with_tokenizer(tiny_gpt2(n_layer=2, seed=2), gpt2_tokenizer, tmp_path / "teacher")
    text = small_text_file(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lmdistill", "generate-corpus", "--teacher", str(tmp_path / "teacher"), "--tokens", "60",
         "--out", str(tmp_path / "c"), "--prompts", str(text), "--prompt-tokens", "8", "--batch-size", "4",
         "--new-tokens", "16", "--precision", "fp32", "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "LMDISTILL_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["settings"]
    assert manifest["prompts"] == str(text) and manifest["prompt_tokens"] == 8 and manifest["precision"] == "fp32"
    prompts = [json.loads(line)["prompt"] for part in sorted((tmp_path / "c").glob("part-*.jsonl"))
               for line in part.read_text().splitlines()]
    within = [p for p in prompts if p and "<|endoftext|>" not in p]  # windows inside one document
    assert within and all(p in text.read_text() for p in within)
