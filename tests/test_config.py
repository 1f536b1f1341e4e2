"""Typed run configuration: YAML round trip, bundled recipes, override coercion and checks."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lmdistill.config import (
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from lmdistill.recipe import load_config, resolve_recipe

BUDGET = ["train.max_steps=10"]


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# Round trip and recipes


def custom_config() -> RunConfig:
    return RunConfig(
        model=ModelConfig(teacher="some/folder", student="other/student", layers=[0, 3, 5], strategy="uniform",
                          random_init=True),
        data=DataConfig(sources=["corpus:austen", "/data/x.txt"], prepared_dir="/tmp/prep", block_size=64),
        loss=LossConfig(kl=1.5, ce=0.0, cos=0.25, mse=3.0, temperature=1.5),
        train=TrainConfig(batch_size=3, grad_accum=2, lr=1e-3, adam_eps=1e-8, weight_decay=0.01, betas=[0.8, 0.95],
                          warmup=10.0, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=0.0,
                          freeze_pos_embeddings=False, max_steps=None, max_tokens=12345, max_minutes=2.5,
                          eval_every=0, eval_tokens=99, checkpoint_every=7, seed=3, device="cpu",
                          threads=2),
    )


@pytest.mark.parametrize("make", [RunConfig, custom_config, lambda: load_config("distilgpt2"),
                                  lambda: load_config("smollm2-demo")])
def test_yaml_round_trip(make, tmp_path):
    config = make()
    text = config.to_yaml()
    path = write(tmp_path, text)
    again = load_config(path)
    assert again == config
    assert again.to_yaml() == text
    assert RunConfig.from_dict(yaml.safe_load(text)) == config
    # Types survive (not just equal values): floats stay floats, ints stay ints.
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(config, section.name)):
            a, b = getattr(getattr(config, section.name), f.name), getattr(getattr(again, section.name), f.name)
            assert type(a) is type(b) or (isinstance(a, (int, float)) and float(a) == float(b)), (section.name, f.name)


def test_distilgpt2_recipe():
    c = load_config("distilgpt2")
    assert c.model.teacher == "gpt2"
    assert c.model.layers == [0, 2, 4, 7, 9, 11]
    assert c.model.student is None and c.model.random_init is False
    assert (c.loss.kl, c.loss.ce, c.loss.cos, c.loss.mse, c.loss.temperature) == (5.0, 2.0, 1.0, 0.0, 2.0)
    assert c.train.lr == pytest.approx(2.5e-4) and isinstance(c.train.lr, float)
    assert c.train.adam_eps == pytest.approx(1e-6) and isinstance(c.train.adam_eps, float)
    assert c.train.max_grad_norm == 5.0
    assert c.train.weight_decay == 0.0
    assert c.train.warmup == pytest.approx(0.05)
    assert c.train.freeze_pos_embeddings is True
    assert c.train.schedule == "linear"
    assert c.data.block_size == 1024


def test_smollm2_demo_recipe():
    c = load_config("smollm2-demo")
    assert c.model.teacher == "smollm2-135m"
    assert c.model.num_layers == 15 and c.model.layers is None and c.model.strategy == "auto"
    assert c.train.max_minutes == 10 and c.train.max_steps is None
    assert c.train.lr == pytest.approx(1e-3)
    assert (c.loss.kl, c.loss.ce, c.loss.cos) == (5.0, 2.0, 1.0)


def test_recipe_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bundled names work from any directory
    assert load_config("distilgpt2.yaml") == load_config("distilgpt2")
    assert resolve_recipe("configs/distilgpt2.yaml").is_file()
    # A local file wins over a bundled recipe of the same name.
    write(tmp_path, "train: {max_steps: 7}\n", name="distilgpt2.yaml")
    assert load_config("distilgpt2.yaml").train.max_steps == 7
    with pytest.raises(ConfigError, match="distilgpt2, smollm2-demo"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "sub" / "distilgpt2.yaml")


def test_overrides_apply_over_recipe():
    c = load_config("distilgpt2", ["train.max_steps=5", "model.teacher=/x/teacher", "loss.kl=0.5"])
    base = load_config("distilgpt2")
    assert c.train.max_steps == 5 and c.model.teacher == "/x/teacher" and c.loss.kl == 0.5
    assert c.model.layers == base.model.layers and c.train.lr == base.train.lr and c.train.seed == base.train.seed


# ---------------------------------------------------------------------------------------
# Coercion


@pytest.mark.parametrize("override, section, name, expected", [
    ("train.max_steps=10", "train", "max_steps", 10),
    ("train.max_steps=1e3", "train", "max_steps", 1000),
    ("train.batch_size=4.0", "train", "batch_size", 4),
    ("train.lr=1e-3", "train", "lr", 1e-3),
    ("train.lr=1.5E-3", "train", "lr", 1.5e-3),
    ("train.lr=0.01", "train", "lr", 0.01),
    ("train.max_minutes=2", "train", "max_minutes", 2.0),
    ("loss.kl=3", "loss", "kl", 3.0),
    ("train.freeze_pos_embeddings=false", "train", "freeze_pos_embeddings", False),
    ("train.freeze_pos_embeddings=no", "train", "freeze_pos_embeddings", False),
    ("train.freeze_pos_embeddings=True", "train", "freeze_pos_embeddings", True),
    ("train.freeze_pos_embeddings=on", "train", "freeze_pos_embeddings", True),
    ("model.random_init=1", "model", "random_init", True),
    ("model.layers=0,2,4", "model", "layers", [0, 2, 4]),
    ("model.layers=[0,2]", "model", "layers", [0, 2]),
    ("model.layers=[0, 2, 4]", "model", "layers", [0, 2, 4]),
    ("train.betas=0.8,0.9", "train", "betas", [0.8, 0.9]),
    ("train.betas=[0.5, 0.99]", "train", "betas", [0.5, 0.99]),
    ("data.sources=a.txt,corpus:austen", "data", "sources", ["a.txt", "corpus:austen"]),
    ("data.sources=corpus:austen", "data", "sources", ["corpus:austen"]),
    ("data.sources=[corpus:austen, b.jsonl]", "data", "sources", ["corpus:austen", "b.jsonl"]),
    ("model.student=null", "model", "student", None),
    ("model.student=None", "model", "student", None),
    ("model.teacher=123", "model", "teacher", "123"),
    ("train.threads=none", "train", "threads", None),
    ("train.dropout=0", "train", "dropout", 0.0),
    ("train.dropout=null", "train", "dropout", None),
])
def test_override_coercion(override, section, name, expected):
    value = getattr(getattr(load_config(None, BUDGET + [override]), section), name)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_override_scalar_for_float_list_item_types():
    c = load_config(None, BUDGET + ["train.betas=0,0.5"])
    assert c.train.betas == [0.0, 0.5] and all(type(b) is float for b in c.train.betas)


def test_override_single_layer():
    assert load_config(None, BUDGET + ["model.layers=3"]).model.layers == [3]


@pytest.mark.parametrize("override, field", [
    ("train.max_steps=true", "train.max_steps"),
    ("model.layers=[true, 2]", "model.layers"),
])
def test_bool_is_not_an_int(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, BUDGET + [override])


@pytest.mark.parametrize("override, field", [
    ("train.lr=abc", "train.lr"),
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.max_steps=ten", "train.max_steps"),
    ("train.freeze_pos_embeddings=maybe", "train.freeze_pos_embeddings"),
    ("model.layers=a,b", "model.layers"),
    ("model.layers=[1.5]", "model.layers"),
    ("train.lr=null", "train.lr"),
    ("train.lr=", "train.lr"),
    ("model.teacher=null", "model.teacher"),
])
def test_override_type_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, BUDGET + [override])


# ---------------------------------------------------------------------------------------
# Checks


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=1", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.betas=1,0.9", "train.betas"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.warmup=-1", "train.warmup"),
    ("train.warmup=nan", "train.warmup"),
    ("train.schedule=step", "train.schedule"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_tokens=0", "train.max_tokens"),
    ("train.max_minutes=0", "train.max_minutes"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.eval_tokens=0", "train.eval_tokens"),
    ("train.checkpoint_every=-5", "train.checkpoint_every"),
    ("train.threads=0", "train.threads"),
    ("train.dropout=1", "train.dropout"),
    ("train.dropout=-0.1", "train.dropout"),
    ("train.dropout=nan", "train.dropout"),
    ("loss.kl=-1", "loss.kl"),
    ("loss.ce=nan", "loss.ce"),
    ("loss.cos=inf", "loss.cos"),
    ("loss.mse=-0.5", "loss.mse"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.temperature=-2", "loss.temperature"),
    ("loss.temperature=inf", "loss.temperature"),
    ("data.block_size=4", "data.block_size"),
    ("data.block_size=2000000", "data.block_size"),
    ("data.sources=[]", "data.sources"),
    ("model.strategy=random", "model.strategy"),
    ("model.num_layers=0", "model.num_layers"),
    ("model.layers=[]", "model.layers"),
    ("model.layers=[-1, 2]", "model.layers"),
    ("train.device=tpu", "train.device"),
    ("train.seed=-1", "train.seed"),
    ("train.warmup=inf", "train.warmup"),
    ("train.max_minutes=inf", "train.max_minutes"),
    ("train.adam_eps=inf", "train.adam_eps"),
    ("train.weight_decay=inf", "train.weight_decay"),
    # 0 or infinite once cast to float32, the dtype of the weights, optimizer state and losses
    ("train.adam_eps=1e-300", "train.adam_eps"),
    ("train.adam_eps=1e-40", "train.adam_eps"),  # a float32 subnormal: flushed to 0 on some hardware
    ("train.lr=1e-50", "train.lr"),
    ("train.weight_decay=1e-300", "train.weight_decay"),
    ("train.max_grad_norm=1e-300", "train.max_grad_norm"),
    ("train.max_grad_norm=inf", "train.max_grad_norm"),
    ("train.betas=[0.9, 0.999999999]", "train.betas"),  # 1.0 in float32
    ("loss.kl=1e39", "loss.kl"),
    ("loss.ce=1e-60", "loss.ce"),
    ("loss.align_mse=1e-45", "loss.align_mse"),
    ("loss.temperature=1e-30", "loss.temperature"),
    ("loss.temperature=1e3", "loss.temperature"),
    ("loss.divergence=kl", "loss.divergence"),
    (["loss.divergence=jsd", "loss.jsd_beta=1.5"], "loss.jsd_beta"),
    (["loss.divergence=skew_kl", "loss.skew_alpha=-0.1"], "loss.skew_alpha"),
    (["loss.divergence=skew_reverse_kl", "loss.skew_alpha=nan"], "loss.skew_alpha"),
    (["loss.divergence=jsd", "loss.jsd_beta=true"], "loss.jsd_beta"),
    (["data.sources=[corpus:austen,corpus:sotu]", "data.repeats=[1]"], "data.repeats"),
    (["data.sources=[corpus:austen,corpus:sotu]", "data.repeats=[1,0]"], "data.repeats"),
    (["data.sources=[corpus:austen,corpus:sotu]", "data.repeats=[1,nan]"], "data.repeats"),
    (["data.sources=[corpus:austen,corpus:austen]", "data.repeats=[1,2]"], "data.repeats"),
])
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, BUDGET + (override if isinstance(override, list) else [override]))


@pytest.mark.parametrize("override, field, value", [
    ("train.adam_eps=1.2e-38", "adam_eps", 1.2e-38),
    ("train.lr=1.2e-38", "lr", 1.2e-38),
    ("train.weight_decay=0", "weight_decay", 0.0),
    ("train.max_grad_norm=0", "max_grad_norm", 0.0),
    ("train.betas=[0.9, 0.99999]", "betas", [0.9, 0.99999]),
    ("loss.kl=3e38", "kl", 3e38),
    ("loss.temperature=100", "temperature", 100.0),
    ("loss.temperature=1.1e-19", "temperature", 1.1e-19),
])
def test_values_float32_keeps_are_accepted(override, field, value):
    config = load_config(None, BUDGET + ["loss.temperature=1", override])
    section = config.train if override.startswith("train.") else config.loss
    assert getattr(section, field) == value


def test_kl_weight_times_temperature_squared_must_fit_float32():
    with pytest.raises(ConfigError, match=r"loss\.kl \* loss\.temperature\^2"):
        LossConfig(kl=1e36, temperature=100.0)


def test_temperature_bounds_match_float32_kl():
    """The bounds of loss.temperature, measured: inside them the float32 KL term (times T^2) agrees
    with float64; beyond them it is exactly 0 (T^2 underflows) or rounding noise."""
    import torch

    from lmdistill.loss.terms import kl_divergence

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 50257, generator=gen, dtype=torch.float64) * 3  # GPT-2-sized vocabulary
    teacher = student + torch.randn(2, 4, 50257, generator=gen, dtype=torch.float64)

    def rel_error(t: float) -> float:
        exact = kl_divergence(student, teacher, None, t).item()
        return abs(kl_divergence(student.float(), teacher.float(), None, t).item() - exact) / exact

    # Measured 2e-3 at T=100 and ~1e-7 at 2^-63 (any x86 CPU rounds alike within a few times that).
    assert rel_error(TEMPERATURE_MAX) < 1e-2
    assert rel_error(TEMPERATURE_MIN) < 1e-3
    assert rel_error(100 * TEMPERATURE_MAX) > 1  # measured ~8: the float32 term is noise
    assert kl_divergence(student.float(), teacher.float(), None, TEMPERATURE_MIN / 1e4).item() == 0.0


def test_recipe_files_that_are_not_mappings(tmp_path):
    with pytest.raises(ConfigError, match=r"list\.yaml holds a YAML list, not a mapping"):
        load_config(write(tmp_path, "- train: {max_steps: 1}\n", "list.yaml"))
    with pytest.raises(ConfigError, match=r"not UTF-8"):
        path = tmp_path / "latin1.yaml"
        path.write_bytes(b"model: {teacher: caf\xe9}\n")
        load_config(path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "train:\n  max_steps: 1\n  lr: [1\n", "broken.yaml"))
    message = str(info.value)
    assert "broken.yaml is not valid YAML at line" in message and "\n" not in message
    assert load_config(write(tmp_path, "", "empty.yaml"), BUDGET).train.max_steps == 10  # empty: all defaults


def test_all_loss_weights_zero():
    with pytest.raises(ConfigError, match="at least one of kl, ce, cos, mse"):
        load_config(None, BUDGET + ["loss.kl=0", "loss.ce=0", "loss.cos=0", "loss.mse=0"])
    assert load_config(None, BUDGET + ["loss.kl=0", "loss.cos=0"]).loss.ce == 2.0


def test_checks_run_on_direct_construction():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        TrainConfig(lr=2.0, max_steps=1)
    with pytest.raises(ConfigError, match=r"model\.layers"):
        ModelConfig(layers=[1.5])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"loss\.temperature"):
        LossConfig(temperature=0.0)


def test_unknown_section_lists_valid_sections(tmp_path):
    with pytest.raises(ConfigError, match="valid sections: model, data, loss, train"):
        load_config(None, BUDGET + ["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"optimizer.*valid sections"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\ntrain: {max_steps: 1}\n"))


def test_unknown_field_lists_valid_fields(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, BUDGET + ["train.nope=1"])
    message = str(info.value)
    assert "train.nope" in message
    for valid in ("lr", "max_steps", "batch_size", "warmup"):
        assert valid in message
    with pytest.raises(ConfigError, match=r"model\.techer.*teacher"):
        load_config(write(tmp_path, "model: {techer: gpt2}\ntrain: {max_steps: 1}\n"))


def test_malformed_overrides_and_files(tmp_path):
    for bad in ("train", "train=5", "max_steps=5"):
        with pytest.raises(ConfigError, match="section.field=value"):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


def test_override_into_empty_yaml_section(tmp_path):
    path = write(tmp_path, "model:\n  # teacher: gpt2\ntrain:\n  max_steps: 3\n")
    assert load_config(path).model.teacher == "gpt2"  # the empty section itself is fine
    assert load_config(path, ["model.teacher=/x"]).model.teacher == "/x"


def test_a_budget_is_required(tmp_path):
    with pytest.raises(ConfigError, match="max_steps, max_tokens or max_minutes"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="max_steps, max_tokens or max_minutes"):
        load_config(write(tmp_path, "train: {lr: 1.0e-3}\n"))
    with pytest.raises(ConfigError, match="max_steps, max_tokens or max_minutes"):
        load_config("distilgpt2", ["train.max_steps=null"])
    with pytest.raises(ConfigError, match="max_steps, max_tokens or max_minutes"):
        TrainConfig()
    assert load_config(None, ["train.max_tokens=1000"]).train.max_tokens == 1000
    assert load_config(None, ["train.max_minutes=0.5"]).train.max_minutes == 0.5
    assert RunConfig().train.max_steps == 100
