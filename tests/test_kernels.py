"""Training-time module changes (lmdistill/models/kernels.py): the fused GELU computes the same
function as GPT-2's chain of operations, and the training dropout reaches every dropout."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

from lmdistill.models.kernels import fuse_activations, set_dropout

from .helpers import tiny_gpt2, tiny_llama


def test_fused_gelu_gives_gpt2_the_same_outputs_and_gradients():
    reference = tiny_gpt2(n_layer=3).double()
    fused = tiny_gpt2(n_layer=3).double()
    assert fuse_activations(fused) == 3  # one per MLP
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == 3
    assert fused.config.activation_function == "gelu_new"  # the saved config still says what the model is
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (reference, fused):
        logits = model(input_ids=ids).logits
        (logits.float().pow(2).mean()).backward()
        outputs.append((logits.detach(), model.transformer.h[0].mlp.c_fc.weight.grad.clone()))
    # float64: the two forms of the same function differ by rounding (1e-16) that the layers carry
    assert torch.allclose(outputs[0][0], outputs[1][0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(outputs[0][1], outputs[1][1], rtol=1e-9, atol=1e-12)
    # and the fused kernel is the tanh GELU itself, not a coincidence of this model
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    assert torch.allclose(GELUTanh()(x), NewGELUActivation()(x), rtol=0, atol=1e-14)
    assert fuse_activations(tiny_llama()) == 0  # SiLU models have nothing to fuse


def _train_outputs_twice(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


def test_set_dropout_reaches_every_dropout():
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    gpt2 = tiny_gpt2(n_layer=2, dropout=0.1, vocab_size=97)
    first, second = _train_outputs_twice(gpt2, ids)
    assert not torch.equal(first, second)  # dropout at 0.1 is on in train mode
    assert set_dropout(gpt2, 0.0) == 1 + 2 * 3  # embeddings; attention weights, attention output, MLP output
    first, second = _train_outputs_twice(gpt2, ids)
    assert torch.equal(first, second)
    gpt2.eval()
    with torch.no_grad():
        assert torch.allclose(first, gpt2(input_ids=ids).logits, rtol=0, atol=1e-6)

    llama = tiny_llama(num_layers=2)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in llama.model.layers)
    assert set_dropout(llama, 0.3) == 2  # Llama's only dropout: a float each attention passes to its kernel
    assert all(layer.self_attn.attention_dropout == 0.3 for layer in llama.model.layers)
    first, second = _train_outputs_twice(llama, ids)
    assert not torch.equal(first, second)
    assert llama.config.attention_dropout == 0.0  # the config (and so a saved folder) is unchanged
