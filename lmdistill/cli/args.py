"""Argument types and output-path checks shared by the commands: a bad value is refused while
parsing (argparse names the flag), a bad output path before any work starts."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig
from ..errors import LmdistillError


# cache-teacher's tail samples per position and temperature. On the demo recipe (top-64, T=2)
# 256 kept the validation perplexity within 3% of the live teacher's at every evaluation and 64
# did not (docs/teacher_cache.md, "Measured").
DEFAULT_TAIL_SAMPLES = 256


class UsageError(LmdistillError):
    """Command-line arguments that cannot be used together or with these inputs; the message names
    the flags and the fix."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the tool."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def number(requirement: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """A finite float for which ``ok`` holds; ``requirement`` says which in the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, not {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text}")
        return value

    return parse


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers such as 0,2,4,7,9,11, not {text!r}") from None


def parse_temperatures(text: str) -> list[float]:
    try:
        temperatures = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers such as 1,2, not {text!r}") from None
    if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise argparse.ArgumentTypeError(f"takes temperatures > 0 such as 1,2 (loss.temperature of the distill run), "
                                         f"not {text!r}")
    return temperatures


# init-student's options that set the fields of the same names in a recipe's model section: their
# defaults, choices and checks are ModelConfig's.
INIT_STUDENT_FIELDS = ("teacher", "layers", "num_layers", "strategy", "calibration_tokens", "search_objective",
                        "intermediate_size", "num_attention_heads", "num_key_value_heads", "params", "random_init")


def model_field(name: str, parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """The argparse type of the option that sets ModelConfig field ``name``: ``parse`` reads the
    text, ModelConfig converts and checks the value, and argparse names the option in an error."""
    def read(text: str) -> Any:
        try:
            return ModelConfig.read_field(name, parse(text))
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return read


def check_writable(target: Path, flag: str) -> None:
    """``target`` can be created: its nearest existing ancestor is a folder we may write in."""
    from ..atomic import nearest_existing

    parent = nearest_existing(target.parent)
    if not parent.is_dir():
        raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: cannot write under {parent}; choose a path you can write to")


def output_file(path: str | None, flag: str) -> Path | None:
    """Checked before the work starts, so a bad path cannot lose the results at the end."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; pass a file name such as {target / 'results.json'}")
    check_writable(target, flag)
    return target


def write_json(target: Path | None, results: dict) -> None:
    from ..atomic import write_text_atomic

    if target is not None:
        write_text_atomic(target, json.dumps(results, indent=2) + "\n")
