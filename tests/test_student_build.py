"""Student construction: exact tensor copies, parameter counts, saved folders, vocabulary checks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lmdistill.models.arch import Architecture, architecture_of, count_parameters, decoder_layers
from lmdistill.models.errors import ModelError
from lmdistill.models.save import save_model
from lmdistill.student.build import build_student, check_shared_vocabulary, student_layer_map
from lmdistill.student.maps import DISTILGPT2_MAP, layer_map

from .helpers import tiny_gpt2, tiny_llama


def _assert_copied(teacher, student, layers):
    """Every student tensor equals the teacher tensor it was mapped from, and nothing else."""
    arch = architecture_of(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    prefix = arch.layers + "."
    for name, tensor in s_state.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            source = f"{prefix}{layers[int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, t_state[source]), name
    # Copies, not views: training the student must not change the teacher.
    for s_param in student.parameters():
        assert all(s_param.data_ptr() != t_param.data_ptr() for t_param in teacher.parameters())


def test_gpt2_student_copies_mapped_tensors():
    teacher = tiny_gpt2(n_layer=12, vocab_size=300)
    student = build_student(teacher, DISTILGPT2_MAP)
    assert len(decoder_layers(student)) == 6 and student.config.n_layer == 6
    _assert_copied(teacher, student, DISTILGPT2_MAP)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # tied like GPT-2
    assert student_layer_map(student) == DISTILGPT2_MAP


def test_llama_student_copies_mapped_tensors():
    teacher = tiny_llama(num_layers=6)
    layers = [0, 3, 5]
    student = build_student(teacher, layers)
    assert student.config.num_hidden_layers == 3
    _assert_copied(teacher, student, layers)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    # Rotary models keep no position table; the adapter says so.
    assert architecture_of(student).pos_embed is None


def test_student_of_all_layers_reproduces_teacher():
    teacher = tiny_llama(num_layers=3)
    student = build_student(teacher, [0, 1, 2])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        # Copied weights, the same layers and ops on the same ids in one process: bit for bit.
        assert torch.equal(teacher(ids).logits, student(ids).logits)


def test_untied_teacher_gives_untied_student():
    teacher = tiny_llama(num_layers=4)
    teacher.config.tie_word_embeddings = False
    untied = type(teacher)(teacher.config)
    untied.load_state_dict({k: v.clone() for k, v in teacher.state_dict().items()})
    with torch.no_grad():
        untied.lm_head.weight.add_(1.0)
    student = build_student(untied, [1, 3])
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, untied.lm_head.weight)


def test_distilgpt2_parameter_count():
    # GPT-2 124M shape, random weights: the DistilGPT2 cut has 6 layers and 81.9M parameters.
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config())
    student = build_student(teacher, layer_map(12, 6))
    assert count_parameters(teacher) == 124_439_808
    assert len(decoder_layers(student)) == 6
    assert count_parameters(student) == 81_912_576
    assert round(count_parameters(student) / 1e6, 1) == 81.9


def test_random_init_keeps_shape_not_weights():
    teacher = tiny_gpt2(n_layer=4, vocab_size=300)
    student = build_student(teacher, [0, 2], random_init=True, seed=1)
    assert student.config.n_layer == 2
    assert not torch.equal(student.transformer.h[0].attn.c_attn.weight, teacher.transformer.h[0].attn.c_attn.weight)
    assert count_parameters(student) == count_parameters(build_student(teacher, [0, 2]))
    again = build_student(teacher, [0, 2], random_init=True, seed=1)
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, again.transformer.h[1].mlp.c_fc.weight)


def test_saved_student_is_a_normal_hf_folder(tmp_path, gpt2_tokenizer):
    teacher = tiny_gpt2(n_layer=4)
    student = build_student(teacher, [1, 3])
    out = save_model(student, gpt2_tokenizer, tmp_path / "student")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 50257, (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)  # exact weights on disk, same ops
    assert reloaded.config.lmdistill_layer_map == [1, 3]
    # Saving again over the folder replaces it whole.
    save_model(build_student(teacher, [0, 2]), gpt2_tokenizer, out)
    assert AutoModelForCausalLM.from_pretrained(out).config.lmdistill_layer_map == [0, 2]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_vocabulary_mismatch_is_refused():
    teacher = tiny_gpt2(n_layer=2, vocab_size=300)
    other = tiny_gpt2(n_layer=2, vocab_size=400)
    with pytest.raises(ModelError, match="vocabularies differ"):
        check_shared_vocabulary(teacher, other)


def test_unknown_architecture_error():
    class Odd(torch.nn.Module):
        pass

    from lmdistill.models.arch import _discover_architecture

    teacher = tiny_gpt2(n_layer=2, vocab_size=300)
    teacher.config.model_type = "mystery"
    teacher.config.num_hidden_layers = 7  # no ModuleList of 7 layers: the fallback must give up clearly
    with pytest.raises(ModelError, match="does not know the layout"):
        _discover_architecture(teacher)


def test_generic_fallback_finds_parts():
    teacher = tiny_llama(num_layers=3)
    teacher.config.model_type = "llama-like-unknown"
    from lmdistill.models.arch import _discover_architecture

    arch = _discover_architecture(teacher)
    assert isinstance(arch, Architecture)
    assert (arch.layers, arch.final_norm, arch.embed) == ("model.layers", "model.norm", "model.embed_tokens")
