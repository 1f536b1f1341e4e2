"""Layer maps: the static strategies, explicit maps and their checks, and what auto resolves to."""

from __future__ import annotations

import pytest

from lmdistill.student.maps import DISTILGPT2_MAP, layer_map, resolve_strategy, validate_layer_map

from .helpers import tiny_gpt2, tiny_llama


def test_layer_maps():
    assert layer_map(12, 6) == [0, 2, 4, 7, 9, 11] == DISTILGPT2_MAP
    assert layer_map(30, 15) == list(range(0, 30, 2))
    assert layer_map(30, 15, "uniform") == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert layer_map(10, 3, "first") == [0, 1, 2]
    assert layer_map(24, 4, "every-other") == [0, 8, 15, 23]
    assert layer_map(5, 1) == [0]
    for n, k in [(12, 6), (30, 15), (24, 7), (48, 12)]:
        for strategy in ("every-other", "uniform", "first"):
            m = layer_map(n, k, strategy)
            assert len(m) == k and m == sorted(set(m)) and 0 <= m[0] and m[-1] < n


@pytest.mark.parametrize("layers, message", [
    ([0, 12], "out of range"), ([-1, 2], "out of range"), ([2, 2], "repeats"), ([4, 2], "increasing"), ([], "empty"),
])
def test_invalid_layer_maps(layers, message):
    with pytest.raises(ValueError, match=message):
        validate_layer_map(layers, 12)


def test_layer_map_bounds():
    with pytest.raises(ValueError, match="between 1 and 12"):
        layer_map(12, 13)
    with pytest.raises(ValueError, match="unknown layer strategy"):
        layer_map(12, 6, "random")


def test_auto_strategy_follows_the_teacher_family():
    assert resolve_strategy("auto", tiny_llama(num_layers=2).config) == "importance"
    assert resolve_strategy(None, tiny_gpt2(n_layer=2).config) == "every-other"
    assert resolve_strategy("uniform", tiny_llama(num_layers=2).config) == "uniform"
