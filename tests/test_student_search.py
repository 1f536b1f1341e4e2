"""Cut scoring and greedy layer search, checked against students actually built and a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.models.arch import decoder_layers
from lmdistill.student.build import build_student
from lmdistill.student.search import _Recording, format_cut_table, greedy_search, keep_only, make_calibration, score_cut

from .helpers import tiny_gpt2, tiny_llama
from .test_models import tiny_gpt_neo


def _tiny(family: str):
    if family == "llama":
        return tiny_llama(num_layers=4)
    if family == "gpt2":
        return tiny_gpt2(n_layer=4, vocab_size=300)
    return tiny_gpt_neo()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo"])
def test_keep_only_runs_exactly_the_student_it_would_build(family):
    model = _tiny(family)
    layers = [0, 2, 3] if family != "gpt_neo" else [1]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    student = build_student(model, layers)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        with keep_only(model, layers):
            got = model(input_ids=ids, use_cache=False).logits
        full = model(input_ids=ids).logits
    assert torch.equal(got, expected)  # the same layers, weights and ops in one process: bit for bit
    assert len(model.get_submodule("model.layers" if family == "llama" else "transformer.h")) == (
        4 if family != "gpt_neo" else 2)  # restored
    assert not torch.equal(full, expected)


def reference_score(student, blocks: torch.Tensor, teacher) -> tuple[float, float]:
    """CE and KL(teacher || student) per token in float64, written out plainly."""
    with torch.no_grad():
        s = student(input_ids=blocks).logits[:, :-1].double()
        t = teacher(input_ids=blocks).logits[:, :-1].double()
    log_ps = s - torch.logsumexp(s, -1, keepdim=True)
    log_pt = t - torch.logsumexp(t, -1, keepdim=True)
    targets = blocks[:, 1:]
    ce = -np.mean([log_ps[b, i, targets[b, i]].item() for b in range(blocks.shape[0]) for i in range(targets.shape[1])])
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item()
    return ce, kl


def test_score_cut_matches_plain_reference_on_built_student():
    teacher = tiny_llama(num_layers=4)
    tokens = np.random.default_rng(1).integers(0, teacher.config.vocab_size, size=100)
    calib = make_calibration(teacher, tokens, block_size=16, max_tokens=100, batch_size=2)
    assert calib.blocks.shape == (6, 16) and calib.tokens_scored == 6 * 15
    score = score_cut(teacher, calib, [0, 3])
    ce, kl = reference_score(build_student(teacher, [0, 3]), calib.blocks, teacher)
    # score_cut: float32 log-softmax over 97 (~1e-7 relative per token), sums in float64; the
    # reference takes the same float32 logits to float64 (measured: < 0.1% of 1e-5).
    assert score.ce == pytest.approx(ce, rel=1e-5)
    # The KL (2e-3 here) is a sum of p (log p - log q) whose terms cancel: its float32 rounding
    # is ~1e-7 absolute per token, so 1e-4 relative with a floor (measured: <= 12% of it).
    assert score.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    full = score_cut(teacher, calib, [0, 1, 2, 3])
    # The uncut teacher is its own target: the same logits bit for bit (measured: exactly 0);
    # 1e-6 is float32 rounding of O(1) log-probabilities that might not cancel on another kernel.
    assert full.kl == pytest.approx(0.0, abs=1e-6)


def _shrink_layer(model, index: int, factor: float) -> None:
    # Scaling a residual block's output projections scales what it adds to the stream.
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(factor)
        layer.mlp.down_proj.weight.mul_(factor)


@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_search_removes_the_layer_that_costs_least(objective):
    teacher = tiny_llama(num_layers=4, seed=3)
    _shrink_layer(teacher, 2, 0.0)  # an identity block: removing it changes nothing
    _shrink_layer(teacher, 1, 0.05)  # nearly identity: the next cheapest
    tokens = np.random.default_rng(0).integers(0, teacher.config.vocab_size, size=128)
    calib = make_calibration(teacher, tokens, block_size=32, max_tokens=128, batch_size=4)
    seen = []
    result = greedy_search(teacher, calib, keep=2, objective=objective, on_step=seen.append)
    first = result.steps[0]
    assert first.removed == 2
    assert first.candidates[2] == min(first.candidates.values())
    if objective == "kl":
        # Removing an identity block changes no value (h + 0 is h): the KL is exactly 0 (measured);
        # 1e-6 as above, far below the next cheapest candidate.
        assert first.candidates[2] == pytest.approx(0.0, abs=1e-6)
    assert result.steps[1].removed == 1
    assert result.layers == [0, 3] and [s.removed for s in seen] == [2, 1]
    # Each step's recorded score is the score of the cut it leaves (replayed: equal to the bit,
    # see below; 1e-6 leaves room for rounding and still tells cuts apart).
    assert result.steps[1].score.ce == pytest.approx(score_cut(teacher, calib, [0, 3]).ce, rel=1e-6)
    assert set(result.steps[1].candidates) == {0, 1, 3}
    table = format_cut_table({"search": result.steps[-1].score, "full": result.start}, calib.tokens_scored)
    assert "| search | 0,3 |" in table and "| full | 0,1,2,3 |" in table
    assert result.to_dict()["layers"] == [0, 3]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo"])
def test_replayed_layers_give_the_same_scores_and_are_not_run(family):
    """The search replays the recorded outputs of the layers a cut starts with: every cut that
    drops one layer scores exactly as when all its layers run, and its shared layers do not run."""
    model = _tiny(family)
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, size=96)
    calib = make_calibration(model, tokens, block_size=16, max_tokens=96, batch_size=2)  # 3 batches
    layers = list(range(len(decoder_layers(model))))
    recording = _Recording(model, calib, layers)
    assert recording.score == score_cut(model, calib, layers)
    calls = {i: 0 for i in layers}
    hooks = [decoder_layers(model)[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in layers]
    try:
        for dropped in layers:
            cut = [i for i in layers if i != dropped]
            calls.update({i: 0 for i in layers})
            replayed = score_cut(model, calib, cut, recording)
            assert all(calls[i] == 0 for i in layers if i < dropped)  # replayed, not run
            assert all(calls[i] == 3 for i in cut if i > dropped)  # run on each batch
            # Exactly equal CE and KL: the replayed outputs are the values the layers computed, and
            # the rest runs the same ops on them in this process.
            assert replayed == score_cut(model, calib, cut)
    finally:
        for hook in hooks:
            hook.remove()


def test_search_checks_its_arguments():
    teacher = tiny_llama(num_layers=3)
    tokens = np.arange(64) % 97
    with pytest.raises(ValueError, match="choose one of kl, ce"):
        greedy_search(teacher, make_calibration(teacher, tokens, block_size=32), keep=2, objective="loss")
    with pytest.raises(ValueError, match="between 1 and 3"):
        greedy_search(teacher, make_calibration(teacher, tokens, block_size=32), keep=4)
    with pytest.raises(ValueError, match="teacher's targets"):
        greedy_search(teacher, make_calibration(teacher, tokens, block_size=32, with_teacher=False), keep=2)
    with pytest.raises(ValueError, match="calibration tokens"):
        make_calibration(teacher, np.arange(10), block_size=32)
