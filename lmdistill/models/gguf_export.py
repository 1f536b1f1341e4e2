"""Write a Hugging Face causal LM folder as one GGUF file (llama.cpp, Ollama, LM Studio).

``lmdistill export STUDENT --gguf OUT.gguf --type f32|f16|q8_0``. Llama-family models (Llama,
SmolLM2, Mistral-shaped) and GPT-2 are written with the ``gguf`` package's writer and its tensor
name map, with the tokenizer (byte-level BPE: tokens, token types, merges, special ids, chat
template). What each family needs on the way:

- Llama: the query and key rows are reordered per head (interleaved rotary halves, as llama.cpp
  computes RoPE; transformers' GGUF loader undoes it); a tied lm_head is not written
  (``token_embd`` serves both, which is how a loader knows the model ties them).
- GPT-2: ``Conv1D`` weights are stored (in, out) by transformers and (out, in) in GGUF.

Norms, biases and other 1-D tensors stay float32; 2-D weights take the requested type, except
that ``q8_0`` (blocks of 32 values with one scale) falls back to f16 for a matrix whose rows do
not split into such blocks. The file is written under a temporary name and renamed, so that a
killed export leaves no half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelError

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCHES = {"llama": "llama", "mistral": "llama", "gpt2": "gpt2"}  # transformers model_type -> GGUF architecture
Q8_BLOCK = 32


@dataclass
class ExportResult:
    path: Path
    bytes: int
    tensors: int
    types: dict[str, int]
    """How many tensors were written in each GGUF type."""
    tokenizer_pre: str


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, kind: str = "f16",
                name: str | None = None) -> ExportResult:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``out`` with 2-D weights in ``kind``."""
    import gguf

    if kind not in GGUF_TYPES:
        raise ModelError(f"GGUF type {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch = ARCHES.get(getattr(config, "model_type", ""))
    if arch is None:
        raise ModelError(f"GGUF export supports {', '.join(sorted(ARCHES))} models, not {config.model_type!r}; "
                         "use the Hugging Face folder, or convert it with llama.cpp's convert_hf_to_gguf.py")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or out.stem)
        (write_llama_config if arch == "llama" else write_gpt2_config)(writer, config)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        pre = write_tokenizer(writer, tokenizer)
        types = write_tensors(writer, model, arch, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, out.stat().st_size, sum(types.values()), types, pre)


def write_llama_config(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "rope_scaling", None) not in (None, {}) and rope_type(config) != "default":
        raise ModelError(f"GGUF export does not write rope scaling ({config.rope_scaling}); use the HF folder")


def rope_theta(config) -> float:
    # transformers 5 keeps rope_theta inside rope_parameters.
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", 10000.0)


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def write_gpt2_config(writer, config) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase) -> str:
    """A byte-level BPE tokenizer's vocabulary, merges and special ids; returns the pre-tokenizer
    name written (how llama.cpp splits text before BPE)."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else None
    if state is None or state["model"]["type"] != "BPE":
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3 style); this one is "
                         f"{'slow' if state is None else state['model']['type']}")
    vocab = tokenizer.get_vocab()
    size = max(len(vocab), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in state.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    pre = pre_tokenizer_name(state.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's byte-level split (``gpt-2``),
    or it with digits split one by one first (``smollm``); others get ``default``."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    return "default"


def write_tensors(writer, model: PreTrainedModel, arch: str, kind: str) -> dict[str, int]:
    """Every weight under its GGUF name, in the GGUF layout and type; returns counts per type."""
    import gguf

    config = model.config
    layers = config.num_hidden_layers if arch == "llama" else config.n_layer
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or hf_name.endswith(".attn.bias") or hf_name.endswith(".attn.masked_bias"):
            continue  # buffers, not weights
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export does not know where {hf_name} goes; report this model type")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        data = to_gguf_layout(data, name, arch, config)
        data, qtype = to_type(data, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def to_gguf_layout(data: np.ndarray, name: str, arch: str, config) -> np.ndarray:
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else (config.num_key_value_heads or config.num_attention_heads)
        return permute_rotary_rows(data, heads)
    if arch == "gpt2" and any(f".{part}." in name for part in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
        return np.ascontiguousarray(data.T)  # Conv1D (in, out) -> (out, in)
    return data


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from transformers' rotary layout (first half, second half) to the
    interleaved one (pairs), which llama.cpp's RoPE expects."""
    rows = weight.shape[0]
    return np.ascontiguousarray(weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
                                .swapaxes(1, 2).reshape(weight.shape))


def to_type(data: np.ndarray, kind: str):
    """``data`` as stored for GGUF type ``kind`` (1-D tensors stay float32), and that type."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), T.F32
    if kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16
