"""Recipes: a YAML file (a path, or a bundled recipe in ``lmdistill/configs/``) plus
``section.field=value`` overrides, read into a checked :class:`~lmdistill.config.RunConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe from YAML (a path, or the name of a bundled recipe) plus ``a.b=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_recipe(resolve_recipe(path))
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {override!r} must look like section.field=value (e.g. train.max_steps=100)")
        section, name = key.split(".", 1)
        if data.get(section) is None:
            data[section] = {}  # absent, or present in the YAML with every field commented out
        if not isinstance(data[section], dict):
            raise ConfigError(f"config section {section} must be a mapping")
        data[section][name] = yaml.safe_load(raw) if raw else None
    return RunConfig.from_dict(data)


def read_recipe(path: Path) -> dict[str, Any]:
    """The sections of a recipe file; a file that is not a YAML mapping fails naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the recipe there") from None
    if data is None:
        return {}  # an empty file: all defaults
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__}, not a mapping of sections; write the recipe "
                          f"as sections such as 'model:', 'data:', 'loss:', 'train:' (see configs/distilgpt2.yaml)")
    return data


RECIPES_DIR = Path(__file__).parent / "configs"


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: an existing path, or a bundled recipe name such as ``distilgpt2``."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise ConfigError(f"recipe {path} is a folder; pass a recipe YAML file inside it or a bundled recipe name")
    bundled = RECIPES_DIR / (candidate.stem + ".yaml")
    if bundled.is_file() and candidate.parent in (Path("."), Path("configs")):
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {path} not found; pass a YAML file or a bundled recipe ({names})")
