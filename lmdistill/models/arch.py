"""Where the parts of a causal LM live, whatever its family.

The :class:`Architecture` adapter names the decoder-layer list, final norm, embeddings and
lm_head of a causal LM, so that student construction and losses never hard-code a family.
Also the layer count and context length a config states, and parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from .errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """Where the parts of a causal LM live, as attribute paths from the top model.

    ``layers``: the ModuleList of decoder blocks; ``final_norm``: the norm before the lm_head;
    ``embed``: token embeddings; ``pos_embed``: learned position embeddings (None for RoPE);
    ``num_layers_key``: the config field that counts the blocks.
    """

    family: str
    layers: str
    final_norm: str
    embed: str
    pos_embed: str | None
    num_layers_key: str
    lm_head: str = "lm_head"


GPT2 = Architecture("gpt2", "transformer.h", "transformer.ln_f", "transformer.wte", "transformer.wpe", "n_layer")
GPT_NEO = Architecture("gpt_neo", "transformer.h", "transformer.ln_f", "transformer.wte", "transformer.wpe", "num_layers")
LLAMA = Architecture("llama", "model.layers", "model.norm", "model.embed_tokens", None, "num_hidden_layers")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": GPT2,
    "gpt_neo": GPT_NEO,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "phi3": LLAMA,
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    """The adapter for a model: a known family, or one found by looking for its parts."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return _discover_architecture(model)


def _discover_architecture(model: PreTrainedModel) -> Architecture:
    # Generic fallback: the one ModuleList whose length equals the config's layer count.
    num_layers = getattr(model.config, "num_hidden_layers", None)
    layers = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers
    ]
    embed = model.get_input_embeddings()
    embed_name = next((name for name, module in model.named_modules() if module is embed), None)
    norm_name = None
    if len(layers) == 1:
        parent = layers[0].rsplit(".", 1)[0] if "." in layers[0] else ""
        for candidate in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
            full = f"{parent}.{candidate}" if parent else candidate
            try:
                model.get_submodule(full)
            except AttributeError:
                continue
            norm_name = full
            break
    if len(layers) != 1 or embed_name is None or norm_name is None:
        raise ModelError(
            f"lmdistill does not know the layout of model type {getattr(model.config, 'model_type', '?')!r} "
            f"(found decoder lists {layers}, final norm {norm_name}); supported families: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an Architecture entry for it in lmdistill/models/arch.py."
        )
    return Architecture(model.config.model_type, layers[0], norm_name, embed_name, None, "num_hidden_layers")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = model.get_submodule(architecture_of(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights counted once), optionally without embeddings."""
    seen: set[int] = set()
    total = 0
    excluded: set[int] = set()
    if exclude_embeddings and isinstance(model, PreTrainedModel):
        arch = architecture_of(model)
        for part in (arch.embed, arch.pos_embed):
            if part:
                excluded.update(id(p) for p in model.get_submodule(part).parameters())
    for param in model.parameters():
        if id(param) in seen or id(param) in excluded:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def config_num_layers(config) -> int:
    """Decoder layers of a model config, whatever the family calls the field."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelError(f"cannot tell how many layers a {getattr(config, 'model_type', '?')} model has from its config")


def config_context_length(config) -> int | None:
    """Maximum sequence length of a model config, or None when it does not say."""
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None
