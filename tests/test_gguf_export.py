"""lmdistill export --gguf: the file loads back with transformers' GGUF loader and gives the
folder's logits (f32 exactly; f16 and q8_0 within their rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lmdistill.cli import main
from lmdistill.config import ModelConfig
from lmdistill.models.gguf_export import export_gguf, permute_rotary_rows, pre_tokenizer_name
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.student.cut import cut_student

from .helpers import save_with_tokenizer, tiny_llama

GENERATOR = torch.Generator().manual_seed(0)
INPUTS = torch.randint(0, 50257, (2, 24), generator=GENERATOR)


def logits(model, inputs=INPUTS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits.double()


def load_back(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gpt2_1024() -> GPT2LMHeadModel:
    # transformers' GGUF loader reads GPT-2's context length into n_ctx, leaving n_positions at its
    # default 1024: a GPT-2 of another context would load with the wrong position table.
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_f32_export_gives_the_folders_logits(tmp_path, gpt2_tokenizer, family):
    model = tiny_llama(num_layers=2, vocab_size=50257) if family == "llama" else gpt2_1024()
    result = export_gguf(model, gpt2_tokenizer, tmp_path / "m.gguf", "f32")
    assert result.types == {"F32": result.tensors} and result.tokenizer_pre == "gpt-2"
    back = load_back(tmp_path / "m.gguf")
    # The same float32 weights in the same modules: the same float32 logits. 1e-5 absolute bounds a
    # different summation order in another build of the kernels (logits here are below 1).
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=1e-5)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_quantised_exports_are_smaller_and_close(tmp_path, gpt2_tokenizer):
    model = tiny_llama(num_layers=2, vocab_size=50257)
    reference = logits(model)
    sizes = {}
    for kind, bound in (("f16", 2e-3), ("q8_0", 2e-2)):
        result = export_gguf(model, gpt2_tokenizer, tmp_path / f"{kind}.gguf", kind)
        sizes[kind] = result.bytes
        error = (logits(load_back(tmp_path / f"{kind}.gguf")) - reference).abs().max().item()
        # f16 keeps 11 significant bits (relative rounding 2^-11 ~ 5e-4 per weight); q8_0 8 bits per
        # block of 32 with one f16 scale (~4e-3): through two layers, logits of size ~0.5 move by less than
        # the bounds, and by more than 0 (the weights did change).
        assert 0 < error < bound, (kind, error)
    f32 = export_gguf(model, gpt2_tokenizer, tmp_path / "f32.gguf", "f32").bytes
    assert sizes["q8_0"] < sizes["f16"] < f32


def test_a_width_pruned_student_exports(tmp_path, gpt2_tokenizer):
    teacher = tiny_llama(num_layers=4, vocab_size=50257)
    calibration = np.random.default_rng(0).integers(0, 50257, 512)
    model = ModelConfig(layers=[0, 2, 3], calibration_tokens=256, intermediate_size=32, num_attention_heads=2,
                        num_key_value_heads=1)
    student = cut_student(teacher, model, lambda: calibration, block_size=64, seed=0, log=lambda line: None).student
    assert (student.config.intermediate_size, student.config.num_key_value_heads) == (32, 1)
    export_gguf(student, gpt2_tokenizer, tmp_path / "w.gguf", "f32")
    back = load_back(tmp_path / "w.gguf")
    assert (back.config.intermediate_size, back.config.num_attention_heads, back.config.num_key_value_heads) == (32, 2, 1)
    torch.testing.assert_close(logits(back), logits(student), rtol=0, atol=1e-5)


def test_a_smollm2_student_round_trips_with_its_tokenizer(tmp_path, capsys):
    teacher = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    student = cut_student(teacher, ModelConfig(layers=[0, 29]), lambda: None, block_size=64, seed=0,
                          log=lambda line: None).student
    folder = save_with_tokenizer(student, tokenizer, tmp_path / "student")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "s.gguf"), "--type", "f32"]) == 0
    # The bundled teacher's tokenizer is the one transformers builds from its GGUF file: byte-level
    # BPE with GPT-2's split (the hub tokenizer's separate digit split is not in that file).
    assert "pre-split 'gpt-2'" in capsys.readouterr().out
    back = load_back(tmp_path / "s.gguf")
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    torch.testing.assert_close(logits(back, ids), logits(student, ids), rtol=0, atol=1e-5)
    # The tokenizer travels in the file: transformers rebuilds it from the GGUF's vocabulary and merges.
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    text = "Call me Ishmael. Some years ago - never mind how long precisely - 1851."
    assert again(text).input_ids == tokenizer(text).input_ids


def test_rotary_rows_are_interleaved_per_head():
    # Two heads of four rows: (first half, second half) -> pairs.
    weight = np.arange(8, dtype=np.float32)[:, None]
    assert permute_rotary_rows(weight, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    assert pre_tokenizer_name({"type": "Whitespace"}) == "default"


def test_export_refuses_other_families_and_names(tmp_path, gpt2_tokenizer, capsys):
    folder = save_with_tokenizer(tiny_llama(num_layers=1, vocab_size=50257), gpt2_tokenizer, tmp_path / "m")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "m.bin")]) == 2
    assert ".gguf suffix" in capsys.readouterr().err
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    neo = GPTNeoForCausalLM(GPTNeoConfig(num_layers=1, attention_types=[[["global"], 1]], hidden_size=32,
                                         num_heads=2, vocab_size=50257))
    from lmdistill.models.errors import ModelError
    with pytest.raises(ModelError, match="convert_hf_to_gguf"):
        export_gguf(neo, gpt2_tokenizer, tmp_path / "neo.gguf")
    assert not (tmp_path / "neo.gguf").exists()
