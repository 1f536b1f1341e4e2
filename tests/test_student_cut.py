"""The one student cut: distill and init-student cut the same student from the same request."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill.cli import main
from lmdistill.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmdistill.train.plan import prepare_sources
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.train.setup import make_student

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2, tiny_llama

CALIBRATION_TOKENS = 256  # two blocks of the tiny teachers' 128-token context


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("cut")
    return {
        "text": small_text_file(root),
        "gpt2": save_with_tokenizer(tiny_gpt2(n_layer=4, seed=5), gpt2_tokenizer, root / "gpt2"),
        "llama": save_with_tokenizer(tiny_llama(num_layers=4, seed=6, vocab_size=50257), gpt2_tokenizer,
                                     root / "llama"),
    }


@pytest.mark.parametrize("family, strategy, fields, resolved", [
    ("llama", "auto", {}, "importance"),  # auto: importance for a Llama-family teacher
    ("gpt2", "search", {"search_objective": "ce"}, "search"),
    ("gpt2", "uniform", {"random_init": True}, "uniform"),  # fresh weights: the seed must reach both
])
def test_distill_and_init_student_cut_the_same_student(teachers, tmp_path, capsys, family, strategy, fields,
                                                       resolved):
    teacher, text = teachers[family], teachers["text"]
    flags = [f"--{name.replace('_', '-')}" if value is True else f"--{name.replace('_', '-')}={value}"
             for name, value in fields.items()]
    capsys.readouterr()
    rc = main(["init-student", "--teacher", str(teacher), "--num-layers", "2", "--strategy", strategy,
               "--calibration", str(text), "--calibration-tokens", str(CALIBRATION_TOKENS), "--seed", "3",
               *flags, "--out", str(tmp_path / "student")])
    cli_out, err = capsys.readouterr()
    assert rc == 0, err
    from_cli = AutoModelForCausalLM.from_pretrained(tmp_path / "student")

    # distill's cut of the same model section, trained on the same tokens init-student calibrated on.
    config = RunConfig(model=ModelConfig(teacher=str(teacher), num_layers=2, strategy=strategy,
                                         calibration_tokens=CALIBRATION_TOKENS, **fields),
                       data=DataConfig(sources=[str(text)], block_size=128), train=TrainConfig(max_steps=1, seed=3))
    tokens = prepare_sources(load_tokenizer(teacher), [str(text)], str(teacher)).tokens("train")
    from_distill = make_student(config, load_model(teacher), tokens)
    distill_out = capsys.readouterr().out

    layer_map = None if fields.get("random_init") else from_distill.config.lmdistill_layer_map
    assert from_cli.config.lmdistill_layer_map == layer_map
    assert f"({resolved})" in distill_out
    t_state, d_state = from_cli.state_dict(), from_distill.state_dict()
    assert t_state.keys() == d_state.keys()
    for name, tensor in d_state.items():  # the same weights copied (or drawn from the same seed)
        assert torch.equal(t_state[name], tensor), name
    choice = getattr(from_distill.config, "lmdistill_layer_choice", None)
    if resolved in ("importance", "search"):
        # The same measurements, to the bit (floats survive config.json's round trip exactly), and the
        # same lines printed (distill prefixes its own).
        assert choice["strategy"] == resolved and choice["layers"] == from_distill.config.lmdistill_layer_map
        assert json.loads(json.dumps(choice)) == from_cli.config.lmdistill_layer_choice
        table = cli_out[cli_out.index("calibration: 2"):cli_out.index("teacher: 4 layers")]
        assert table.split("\n", 1)[1] in distill_out.replace("[lmdistill] ", "")
    else:
        assert choice is None and getattr(from_cli.config, "lmdistill_layer_choice", None) is None
