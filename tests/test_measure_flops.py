"""The analytic FLOP counter against hand formulas and against torch's FlopCounterMode."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmdistill.measure.flops import attention_flops_per_token, forward_flops_per_token, matmul_params, step_flops
from lmdistill.models.errors import ModelError

SEQ = 16
BATCH = 2


def gpt2_config(n_layer: int = 2, n_inner: int | None = None) -> GPT2Config:
    return GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_inner=n_inner, n_positions=64, vocab_size=101,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")


def llama_config(layers: int = 2) -> LlamaConfig:
    # GQA: 4 query heads, 2 key/value heads of head_dim 8; hidden 32, intermediate 48.
    return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=True,
                       attn_implementation="eager")


def gpt2_by_hand(d: int, layers: int, vocab: int, seq: int, inner: int | None = None) -> int:
    """Forward FLOPs per token from the GPT-2 formula (lm_head tied, counted once)."""
    inner = inner or 4 * d
    per_layer = 2 * (d * 3 * d + d * d + d * inner + inner * d)
    return layers * per_layer + 2 * d * vocab + layers * 2 * 2 * seq * d


def llama_by_hand(d: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int) -> int:
    head_dim = d // heads
    kv = kv_heads * head_dim
    per_layer = 2 * (d * d + 2 * d * kv + d * d + 3 * d * inter)  # q, k+v, o, gate/up/down
    return layers * per_layer + 2 * d * vocab + layers * 2 * 2 * seq * heads * head_dim


def test_gpt2_matches_hand_formula():
    config = gpt2_config()
    assert forward_flops_per_token(config, SEQ) == gpt2_by_hand(32, 2, 101, SEQ)
    assert attention_flops_per_token(config, SEQ) == 2 * 2 * 2 * 32 * SEQ
    custom = gpt2_config(n_inner=80)
    assert forward_flops_per_token(custom, SEQ) == gpt2_by_hand(32, 2, 101, SEQ, inner=80)


def test_llama_gqa_matches_hand_formula():
    assert forward_flops_per_token(llama_config(), SEQ) == llama_by_hand(32, 48, 2, 4, 2, 97, SEQ)


def test_tied_lm_head_counted_once_per_use():
    tied = llama_config()
    untied = llama_config()
    untied.tie_word_embeddings = False
    # Tying changes the parameter count, not the work: the lm_head matmul runs once per token
    # either way, and the embedding lookup is a gather in both.
    assert matmul_params(tied) == matmul_params(untied)
    model = LlamaForCausalLM(tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert matmul_params(model) == matmul_params(tied)


def test_step_flops_breakdown():
    teacher, student = gpt2_config(n_layer=4), gpt2_config(n_layer=2)
    tokens = BATCH * SEQ
    flops = step_flops(teacher, student, SEQ, tokens)
    assert flops["teacher_forward"] == gpt2_by_hand(32, 4, 101, SEQ) * tokens
    assert flops["student_forward"] == gpt2_by_hand(32, 2, 101, SEQ) * tokens
    assert flops["student_backward"] == 2 * flops["student_forward"]
    assert flops["total"] == flops["teacher_forward"] + 3 * flops["student_forward"]
    assert flops["per_token"] == flops["total"] / tokens
    assert step_flops(None, student, SEQ, tokens)["teacher_forward"] == 0
    with pytest.raises(ValueError):
        step_flops(teacher, student, 0, tokens)


def test_a_config_without_its_shape_is_refused_naming_the_fields():
    config = SimpleNamespace(model_type="mystery", num_hidden_layers=2, hidden_size=32)  # no head count
    with pytest.raises(ModelError, match="mystery config.*num_attention_heads/n_head/num_heads"):
        attention_flops_per_token(config, SEQ)


def measured(model: torch.nn.Module, backward: bool = False) -> tuple[int, int]:
    """FlopCounterMode's count of one forward (and of its backward) on random tokens."""
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
    forward = counter.get_total_flops()
    if not backward:
        return forward, 0
    with FlopCounterMode(display=False) as counter:
        logits.float().pow(2).mean().backward()
    return forward, counter.get_total_flops()


# FlopCounterMode counts every matmul that actually runs (addmm for GPT-2's Conv1D, mm for
# Linear, bmm for eager attention's Q.K^T and A.V). Eager attention is used because torch's
# counter has no formula for the CPU SDPA kernel (it would count attention as 0). Both models
# agree exactly with the analytic count. The one matmul our formula leaves out is in older
# transformers' Llama rotary embedding (inv_freq @ position_ids: head_dim FLOPs per token, no
# gradient; transformers 5 uses an elementwise product instead), allowed for below: a few
# parts in 10^4 here, negligible at real sizes.


def test_gpt2_agrees_with_flop_counter():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).train()
    forward, backward = measured(model, backward=True)
    analytic = forward_flops_per_token(model, SEQ) * BATCH * SEQ
    assert forward == analytic
    assert backward == 2 * forward  # every matmul's input and weight gradients


def test_llama_agrees_with_flop_counter():
    torch.manual_seed(0)
    config = llama_config()
    model = LlamaForCausalLM(config).train()
    forward, backward = measured(model, backward=True)
    analytic = forward_flops_per_token(model, SEQ) * BATCH * SEQ
    rotary = config.head_dim * BATCH * SEQ  # inv_freq @ position_ids, once per forward (no gradient)
    assert forward == pytest.approx(analytic, rel=0.01)  # integer counts: off by the rotary term at most
    assert forward - analytic in (0, rotary)
    assert backward == 2 * analytic


def test_student_cut_from_teacher_counts_its_own_layers():
    from lmdistill.student.build import build_student

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(gpt2_config(n_layer=4))
    student = build_student(teacher, [0, 3])
    expected = copy.deepcopy(teacher.config)
    expected.n_layer = 2
    assert forward_flops_per_token(student, SEQ) == forward_flops_per_token(expected, SEQ)
