"""Intermediate-layer alignment: pairs from the layer map, values against a plain reference, zero for the teacher itself."""

from __future__ import annotations

import pytest
import torch

from lmdistill.train.rundir import read_metrics
from lmdistill.config import ConfigError, LossConfig
from lmdistill.loss.terms import layer_alignment_loss
from lmdistill.loss.weighted import distillation_loss
from lmdistill.student.build import build_student
from lmdistill.train.plan import aligned_layers
from lmdistill.train.run import run_training

from .helpers import tiny_llama
from .test_train import make_config, workspace  # noqa: F401  (module fixture)


def reference_alignment(student_states, teacher_states, kind: str) -> float:
    """Mean over layer pairs of the per-token mean of 1 - cos (or squared error per dim), float64."""
    per_layer = []
    for s, t in zip(student_states, teacher_states):
        s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
        if kind == "cos":
            values = [1 - torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(s, t)]
        else:
            values = [((a - b) ** 2).mean() for a, b in zip(s, t)]
        per_layer.append(torch.stack(values).mean())
    return torch.stack(per_layer).mean().item()


@pytest.mark.parametrize("kind", ["cos", "mse"])
def test_alignment_of_a_cut_student_matches_reference(kind):
    teacher = tiny_llama(num_layers=4)
    student = build_student(teacher, [0, 2, 3])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_states = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    out = student(input_ids=ids, output_hidden_states=True)
    pairs = [(0, 0), (1, 2)]  # student layer 1 is teacher layer 2, but is fed teacher layer 0's output
    s_layers = [out.hidden_states[i + 1] for i, _ in pairs]
    t_layers = [t_states[j + 1] for _, j in pairs]
    value = layer_alignment_loss(s_layers, t_layers, kind)
    # float32 dot products and norms over width 32, then means over 24 tokens and 2 pairs:
    # relative error ~1e-7 (width x 2^-24 = 2e-6 at worst); a wrong pair or term changes it by O(1).
    assert value.item() == pytest.approx(reference_alignment(s_layers, t_layers, kind), rel=1e-5)
    assert value.item() > 1e-6  # layer 1 is not aligned at initialisation (cos 0.05, mse 5e-5)
    # Pair (0, 0) is the same layer on the same input in one process: bit-identical states, so
    # mse is exactly 0 and 1 - cos(x, x) is rounding only, at most (width + 2) x 2^-24 = 2e-6.
    assert torch.equal(s_layers[0], t_layers[0])
    same = layer_alignment_loss(s_layers[:1], t_layers[:1], kind).item()
    assert same == 0.0 if kind == "mse" else abs(same) <= 2e-6
    value.backward()
    assert student.model.layers[1].mlp.down_proj.weight.grad is not None
    weights = LossConfig(kl=0, ce=0, cos=0, **{f"align_{kind}": 3.0})
    total = distillation_loss(out.logits, None, ids, weights, student_layers=s_layers, teacher_layers=t_layers)
    assert total.total.item() == pytest.approx(3.0 * value.item(), rel=1e-6)  # the same value times 3: 1-2 roundings
    with pytest.raises(ValueError, match="pass student_layers and teacher_layers"):
        distillation_loss(out.logits, None, ids, weights)


def test_alignment_pairs_follow_the_layer_map():
    config = make_config({"teacher": "t", "text": "x", "data": "d"}, max_steps=1)
    # Student layer i against the teacher's stream that student layer i+1's copy reads: the
    # output of teacher layer map[i+1] - 1 (layers 1, 3-4 and 6 were cut).
    assert aligned_layers(config, [0, 2, 5, 7], 4) == [(0, 1), (1, 4), (2, 6)]
    assert aligned_layers(config, [0, 1, 2, 3], 4) == [(0, 0), (1, 1), (2, 2)]  # nothing cut: its own copy
    config.loss.align_layers = [1]
    assert aligned_layers(config, [0, 2, 5, 7], 4) == [(1, 4)]
    config.loss.align_layers = [3]
    with pytest.raises(ConfigError, match="choose among 0..2"):
        aligned_layers(config, [0, 2, 5, 7], 4)
    with pytest.raises(ConfigError, match="cut from the teacher"):
        aligned_layers(config, None, 4)


def test_alignment_is_zero_when_student_is_the_teacher(workspace, tmp_path):  # noqa: F811
    config = make_config(workspace, max_steps=1)
    config.model.layers = [0, 1, 2, 3]  # every teacher layer: the student starts as the teacher
    config.loss.align_cos, config.loss.align_mse = 1.0, 1.0
    run_training(config, tmp_path / "same", progress=False)
    first = next(r for r in read_metrics(tmp_path / "same" / "metrics.jsonl") if "loss" in r)
    # Equal states and logits up to rounding: 1 - cos(x, x) <= (width + 2) x 2^-24 = 2e-6 per
    # token, mse and KL are second order in a rounding-size difference (< 1e-12); a cut student
    # is at 1e-4 or more (below).
    assert first["align_cos"] == pytest.approx(0.0, abs=2e-6)
    assert first["align_mse"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)

    cut = make_config(workspace, max_steps=1)
    cut.model.layers = [0, 2, 3]
    cut.loss.align_cos = 1.0
    run_training(cut, tmp_path / "cut", progress=False)
    first = next(r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in r)
    assert first["align_cos"] > 1e-4


def test_alignment_needs_a_cut_student(workspace, tmp_path):  # noqa: F811
    config = make_config(workspace, max_steps=1)
    config.model.random_init, config.loss.align_cos = True, 1.0
    with pytest.raises(ConfigError, match="set them to 0"):
        run_training(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
