"""Block influence against a plain float64 reference from the model's own hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.student.importance import block_influence, calibration_blocks, most_influential

from .helpers import tiny_gpt2, tiny_llama


def reference_influence(model, blocks: torch.Tensor, final_norm_path: str) -> list[float]:
    """1 - mean cos(layer input, layer output) from output_hidden_states, in float64.

    HF's last hidden state is after the final norm; with that norm replaced by the identity
    it is the last layer's raw output.
    """
    parent_path, name = final_norm_path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    norm = getattr(parent, name)
    setattr(parent, name, torch.nn.Identity())
    try:
        with torch.no_grad():
            states = model(input_ids=blocks, output_hidden_states=True).hidden_states
    finally:
        setattr(parent, name, norm)
    scores = []
    for x, y in zip(states[:-1], states[1:]):
        x64, y64 = x.double().reshape(-1, x.shape[-1]).numpy(), y.double().reshape(-1, y.shape[-1]).numpy()
        cos = (x64 * y64).sum(1) / (np.linalg.norm(x64, axis=1) * np.linalg.norm(y64, axis=1))
        scores.append(float(np.mean(1 - cos)))
    return scores


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_influence_matches_reference(family):
    model = tiny_llama(num_layers=4) if family == "llama" else tiny_gpt2(n_layer=4, vocab_size=300)
    vocab = model.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, size=200)
    scores = block_influence(model, tokens, block_size=32, max_tokens=200, batch_size=2)
    blocks = torch.as_tensor(np.stack([tokens[i * 33:i * 33 + 32] for i in range(6)]))  # 200 // 6 = 33 apart
    norm = "model.norm" if family == "llama" else "transformer.ln_f"
    expected = reference_influence(model, blocks, norm)
    assert len(scores) == 4
    # Both take cos in float64 of float32 hidden states; the states come from batches of 2 vs 6
    # blocks, whose float32 matmuls may round differently (~1e-7 relative on the states, so on
    # 1 - cos). measured: equal to ~1e-15, 1e-5 allows other kernels; a wrong layer is O(1) off.
    assert np.allclose(scores, expected, rtol=1e-5, atol=1e-7), (scores, expected)
    assert all(0 <= s <= 2 for s in scores)
    assert not model.training


def test_identity_layer_has_zero_influence():
    model = tiny_llama(num_layers=3)
    layer = model.model.layers[1]
    for param in layer.parameters():  # zeroed projections: the residual block returns its input
        torch.nn.init.zeros_(param)
    tokens = np.arange(64) % 97
    scores = block_influence(model, tokens, block_size=32)
    assert scores[1] == pytest.approx(0.0, abs=1e-9)  # 1 - cos(x, x) in float64: ~1e-16 per token
    assert most_influential(scores, 2) == [0, 2]


def test_most_influential_keeps_order_and_checks_range():
    assert most_influential([0.1, 0.5, 0.05, 0.4, 0.3], 3) == [1, 3, 4]
    assert most_influential([0.2, 0.2, 0.1], 1) == [0]
    with pytest.raises(ValueError, match="between 1 and 3"):
        most_influential([0.1, 0.2, 0.3], 4)
    with pytest.raises(ValueError, match="calibration tokens"):
        block_influence(tiny_llama(num_layers=2), np.arange(10), block_size=32)


def test_calibration_blocks_are_spread_over_the_whole_stream():
    model = tiny_llama(num_layers=2)
    # Two "sources" one after the other, as a prepared training stream is: 3,000 tokens of one,
    # 1,000 of the other. The first 512 tokens would all be the first source's.
    stream = np.concatenate([np.arange(3000) % 100, 100 + np.arange(1000) % 100])
    blocks = calibration_blocks(model, stream, block_size=64, max_tokens=512, purpose="test")
    assert blocks.shape == (8, 64) and blocks.dtype == torch.int64
    starts = [i * 500 for i in range(8)]  # 4,000 // 8 apart: disjoint, first at 0, last ending inside
    for row, start in zip(blocks, starts):
        assert torch.equal(row, torch.as_tensor(stream[start:start + 64]))
    assert (blocks >= 100).any(dim=1).sum() == 2  # the second source's quarter gets its quarter of blocks
    # A stream no longer than the budget is cut into consecutive blocks, as before.
    whole = calibration_blocks(model, stream[:512], block_size=64, max_tokens=4096, purpose="test")
    assert torch.equal(whole.flatten(), torch.as_tensor(stream[:512]))
    # The block is capped at the model's context.
    assert calibration_blocks(model, stream, block_size=10_000, max_tokens=4000, purpose="test").shape[1] == \
        model.config.max_position_embeddings
