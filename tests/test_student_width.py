"""Width pruning: a pruned student computes what the teacher computes with the pruned units zeroed."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmdistill.cli import main
from lmdistill.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from lmdistill.train.plan import prepare_sources
from lmdistill.models.arch import count_parameters, decoder_layers
from lmdistill.models.errors import ModelError
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.student.build import build_student
from lmdistill.student.cut import cut_student
from lmdistill.student.width import WidthShape, choose_width, resolve_width, student_parameters, width_importance
from lmdistill.train.run import run_training
from lmdistill.train.setup import make_student

from .helpers import tiny_gpt2, tiny_llama
from .test_models import tiny_gpt_neo
from .test_student_cut import teachers  # noqa: F401  (the fixture: tiny GPT-2 and Llama folders, a text file)

VOCAB = 97
CALIBRATION = np.random.default_rng(0).integers(0, VOCAB, 512)
INPUTS = torch.as_tensor(np.random.default_rng(1).integers(0, VOCAB, (2, 24)))
# Pruned and masked models sum the same float64 products (the masked ones add exact zeros) in a
# different order: rounding ~1e-16 relative on logits of size ~1, so 1e-12 leaves a wide margin
# while a wrongly kept or dropped unit moves logits by ~1e-4 or more even at init scale.
F64_ATOL = 1e-12


def tiny_teacher(family: str) -> torch.nn.Module:
    # Llama: 4 query heads in 2 key/value groups (GQA), 64 neurons; GPT-2: 2 heads, 128 neurons;
    # GPT-Neo: 2 layers (global, then local attention), 128 neurons.
    teachers = {"llama": lambda: tiny_llama(num_layers=4, seed=3, vocab_size=VOCAB),
                "gpt2": lambda: tiny_gpt2(n_layer=4, seed=3, vocab_size=VOCAB),
                "gpt_neo": lambda: tiny_gpt_neo(seed=3)}
    return teachers[family]().double()


def log_nothing(line: str) -> None:
    pass


def masked_logits(model, chosen, shape: WidthShape) -> torch.Tensor:
    """``model``'s logits with the MLP neurons and heads that ``chosen`` drops zeroed at the input
    of the output projections (which is exactly what removing them does)."""
    family_llama = hasattr(decoder_layers(model)[0], "self_attn")

    def zero_except(keep: torch.Tensor, unit: int):
        def hook(module, args):
            x = args[0].unflatten(-1, (-1, unit))
            mask = torch.zeros(x.shape[-2], 1, dtype=x.dtype)
            mask[keep] = 1
            return ((x * mask).flatten(-2),)
        return hook

    handles = []
    for layer, keep in zip(decoder_layers(model), chosen, strict=True):
        mlp_out = layer.mlp.down_proj if family_llama else layer.mlp.c_proj
        handles.append(mlp_out.register_forward_pre_hook(zero_except(keep.neurons, 1)))
        if keep.heads is not None:
            o_proj = layer.self_attn.o_proj
            handles.append(o_proj.register_forward_pre_hook(zero_except(torch.tensor(keep.heads), shape.head_dim)))
    try:
        with torch.no_grad():
            return model(input_ids=INPUTS).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family, layers, widths, expect", [
    ("llama", [0, 1, 2, 3], {"intermediate_size": 40}, (40, 4, 2)),
    ("llama", [0, 2, 3], {"num_attention_heads": 2}, (64, 2, 2)),  # one query head kept in each group
    ("llama", [1, 3], {"num_key_value_heads": 1}, (64, 2, 1)),  # a whole group dropped
    ("llama", [0, 1, 3], {"intermediate_size": 24, "num_attention_heads": 1, "num_key_value_heads": 1}, (24, 1, 1)),
    ("gpt2", [0, 2, 3], {"intermediate_size": 50}, (50, 2, 2)),
    ("gpt_neo", [1], {"intermediate_size": 50}, (50, 2, 2)),  # nn.Linear where GPT-2 has Conv1D
])
def test_pruned_student_equals_teacher_with_pruned_units_zeroed(tmp_path, family, layers, widths, expect):
    teacher = tiny_teacher(family)
    model = ModelConfig(layers=layers, calibration_tokens=256, **widths)
    cut = cut_student(teacher, model, lambda: CALIBRATION, block_size=64, seed=0, log=log_nothing)
    student = cut.student
    shape = WidthShape.of(student.config)
    assert (shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads) == expect

    # The reference: the depth cut alone, run with the dropped units zeroed, ranked again independently.
    depth_only = build_student(teacher, layers)
    importance = width_importance(teacher, CALIBRATION, layers, block_size=64, max_tokens=256)
    chosen = choose_width(importance, layers, WidthShape.of(teacher.config), shape)
    for k, keep in enumerate(chosen):  # each layer keeps its own most active neurons
        scores = importance.neurons[k]
        dropped = torch.ones(len(scores), dtype=torch.bool)
        dropped[keep.neurons] = False
        assert len(keep.neurons) == expect[0]
        assert not dropped.any() or scores[keep.neurons].min() > scores[dropped].max()
    expected = masked_logits(depth_only, chosen, shape)
    with torch.no_grad():
        got = student(input_ids=INPUTS).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=F64_ATOL, rtol=0)
    with torch.no_grad():  # and the pruning did change the model
        assert (depth_only(input_ids=INPUTS).logits - expected).abs().max() > 1e-6

    # A normal HF folder: it reloads to the same logits, with the new sizes in its config.
    student.save_pretrained(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=INPUTS).logits, got)
    record = config["lmdistill_width_choice"]
    assert record["student"] == shape.to_dict() and record["calibration_tokens"] == 256
    assert [row["teacher_layer"] for row in record["layers"]] == layers
    if family == "llama":
        assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
                config["head_dim"]) == (*expect, 8)  # head_dim stays the teacher's 32 / 4
        assert [row["heads"] for row in record["layers"]] == [keep.heads for keep in chosen]
    else:
        assert config["n_inner" if family == "gpt2" else "intermediate_size"] == expect[0]


def test_importance_ranks_a_planted_neuron_and_head_first():
    # Multi-head (4 key/value heads for 4 query heads) so each head has its own value rows to scale.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                         max_position_embeddings=128)).double().eval()
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.mlp.up_proj.weight[37] *= 50  # neuron 37's activation grows 50-fold
        layer.self_attn.v_proj.weight[2 * 8:3 * 8] *= 50  # head 2's output grows 50-fold
    importance = width_importance(model, CALIBRATION, [0, 1], block_size=64, max_tokens=256)
    assert importance.neurons[1].argmax() == 37 and importance.heads[1].argmax() == 2
    assert importance.neurons[0].argmax() != 37 or importance.heads[0].argmax() != 2  # layer 0 was left alone

    gpt2 = tiny_gpt2(n_layer=2, seed=0, vocab_size=VOCAB).double()
    with torch.no_grad():
        gpt2.transformer.h[0].mlp.c_fc.weight[:, 5] *= 50  # Conv1D: (in, out), so neuron 5 is a column
    assert width_importance(gpt2, CALIBRATION, [0], block_size=64, max_tokens=256).neurons[0].argmax() == 5


def test_gqa_groups_are_ranked_by_their_heads_summed():
    teacher = tiny_teacher("llama")
    with torch.no_grad():
        teacher.model.layers[0].self_attn.v_proj.weight[8:16] *= 50  # key/value head 1 feeds query heads 2, 3
    cut = cut_student(teacher, ModelConfig(layers=[0], calibration_tokens=256, num_key_value_heads=1),
                      lambda: CALIBRATION, block_size=64, seed=0, log=log_nothing)
    row = cut.student.config.lmdistill_width_choice["layers"][0]
    assert row["kv_heads"] == [1] and row["heads"] == [2, 3]


@pytest.mark.parametrize("family, widths, error, match", [
    ("llama", {"intermediate_size": 65}, ConfigError, r"model.intermediate_size \(--intermediate-size\): 65 is more "
                                                      r"than the teacher's 64.*at most 64"),
    ("llama", {"num_key_value_heads": 3}, ConfigError, r"model.num_key_value_heads.*at most 2"),
    ("llama", {"num_attention_heads": 3}, ConfigError, r"model.num_attention_heads.*multiple of 2 up to 4"),
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1}, ConfigError,
     r"model.num_attention_heads.*multiple of 1 up to 2"),  # 4 heads on 1 group: more than 2 per group
    ("gpt2", {"num_attention_heads": 1}, ModelError, r"n_embd / n_head.*model.intermediate_size.*n_inner"),
])
def test_bad_width_requests_name_the_field_and_the_fix(family, widths, error, match):
    with pytest.raises(error, match=match):
        resolve_width(tiny_teacher(family).config, ModelConfig(**widths), 4)


@pytest.mark.parametrize("heads", [None, 2])
def test_params_target_picks_the_widest_mlp_that_fits(heads):
    teacher = tiny_teacher("llama")
    full = WidthShape.of(teacher.config)
    # Any target between the narrowest and the widest 3-layer student: the largest intermediate size within it.
    narrow = student_parameters(teacher.config, 3, WidthShape(1, heads or 4, 2, 8))
    wide = student_parameters(teacher.config, 3, WidthShape(full.intermediate_size, heads or 4, 2, 8))
    target = (narrow + wide) // 2
    model = ModelConfig(layers=[0, 1, 3], num_attention_heads=heads, params=f"{target / 1e3}K", calibration_tokens=256)
    cut = cut_student(teacher, model, lambda: CALIBRATION, block_size=64, seed=0, log=log_nothing)
    chosen = WidthShape.of(cut.student.config)
    count = count_parameters(cut.student)
    assert 1 < chosen.intermediate_size < full.intermediate_size and chosen.num_attention_heads == (heads or 4)
    one_more = replace(chosen, intermediate_size=chosen.intermediate_size + 1)
    assert count <= target < student_parameters(teacher.config, 3, one_more)
    record = cut.student.config.lmdistill_width_choice
    assert record["params_target"] == target and record["params"] == count

    with pytest.raises(ConfigError, match=rf"model.params \(--params\): {wide + 1:,} parameters is out of reach at "
                                          rf"3 layers of {heads or 4} heads.*{narrow:,} \(1 MLP neuron\) to "
                                          rf"{wide:,}.*model.num_layers"):
        resolve_width(teacher.config, ModelConfig(params=str(wide + 1), num_attention_heads=heads), 3)
    with pytest.raises(ConfigError, match="give one of model.params and model.intermediate_size"):
        ModelConfig(params="1M", intermediate_size=8)
    with pytest.raises(ConfigError, match="model.params: cannot read '81.4Q'.*81.4M"):
        ModelConfig(params="81.4Q")


def test_heads_not_a_multiple_of_groups_is_refused_in_the_recipe():
    with pytest.raises(ConfigError, match=r"model.num_attention_heads: 3 is not a multiple of "
                                          r"model.num_key_value_heads=2.*choose a multiple of 2"):
        ModelConfig(num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="model.intermediate_size: 0 must be at least 1"):
        ModelConfig(intermediate_size=0)


@pytest.mark.parametrize("family, strategy, fields", [
    ("llama", "importance", {"intermediate_size": 40, "num_key_value_heads": 1}),  # depth and width measured
    ("gpt2", "uniform", {"intermediate_size": 48}),  # a static depth cut: width alone still calibrates
    ("llama", "uniform", {"num_attention_heads": 2, "random_init": True}),  # fresh weights of the narrow shape
    ("llama", "first", {"params": "1.62M"}),  # 2 layers of 1 to 64 neurons hold 1,614,720 to 1,626,816 parameters
])
def test_distill_and_init_student_cut_the_same_narrow_student(teachers, tmp_path, capsys, family, strategy, fields):
    teacher, text = teachers[family], teachers["text"]
    flags = [f"--{name.replace('_', '-')}" if value is True else f"--{name.replace('_', '-')}={value}"
             for name, value in fields.items()]
    rc = main(["init-student", "--teacher", str(teacher), "--num-layers", "2", "--strategy", strategy,
               "--calibration", str(text), "--calibration-tokens", "256", "--seed", "3", *flags,
               "--out", str(tmp_path / "student")])
    assert rc == 0, capsys.readouterr().err
    from_cli = AutoModelForCausalLM.from_pretrained(tmp_path / "student")

    config = RunConfig(model=ModelConfig(teacher=str(teacher), num_layers=2, strategy=strategy, calibration_tokens=256,
                                         **fields),
                       data=DataConfig(sources=[str(text)], block_size=128), train=TrainConfig(max_steps=1, seed=3))
    tokens = prepare_sources(load_tokenizer(teacher), [str(text)], str(teacher)).tokens("train")
    from_distill = make_student(config, load_model(teacher), tokens)
    assert from_cli.config.lmdistill_width_choice == json.loads(json.dumps(from_distill.config.lmdistill_width_choice))
    assert from_cli.config.lmdistill_width_choice["student"] == WidthShape.of(from_cli.config).to_dict()
    c_state, d_state = from_cli.state_dict(), from_distill.state_dict()
    assert c_state.keys() == d_state.keys()
    for name, tensor in d_state.items():
        assert torch.equal(c_state[name], tensor), name


def test_distill_trains_a_width_pruned_student(teachers, tmp_path):
    # Aligned-layer losses read hidden states, whose size width pruning keeps, so every term runs.
    config = RunConfig(model=ModelConfig(teacher=str(teachers["llama"]), num_layers=2, strategy="importance",
                                         calibration_tokens=256, intermediate_size=40, num_attention_heads=2),
                       data=DataConfig(sources=[str(teachers["text"])], prepared_dir=str(tmp_path / "data"),
                                       block_size=32),
                       train=TrainConfig(max_steps=2, batch_size=2, eval_every=0, checkpoint_every=0, eval_tokens=32,
                                         threads=1))
    config.loss.align_cos = 0.5
    summary = run_training(config, tmp_path / "run", progress=False)
    assert summary["finished"] and summary["step"] == 2
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert WidthShape.of(final.config) == WidthShape(40, 2, 2, 8)
    assert final.config.lmdistill_width_choice == initial.config.lmdistill_width_choice
    assert any(not torch.equal(p, initial.state_dict()[n]) for n, p in final.state_dict().items())
