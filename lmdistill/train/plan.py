"""A recipe resolved once, before any weights or data load.

:func:`plan_run` reads what the checks need from the models' configs and tokenizers (cheap:
JSON and tokenizer files) and refuses a recipe that cannot run with a message that names
the field and the fix. Everything after it (set-up, loop, checkpoints) reads the resolved
:class:`RunPlan` instead of deriving the same pieces from the config again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from ..config import ConfigError, RunConfig, check_teacher_cache_settings
from ..data.prepare import PreparedData, prepare
from ..models.arch import config_context_length, config_num_layers
from ..models.cache import cache_dir
from ..models.fingerprint import config_fingerprint, tokenizer_fingerprint
from ..models.load import load_tokenizer, model_config
from ..student.maps import check_layer_request, resolve_strategy, student_depth
from ..student.width import resolve_width
from ..teacher_cache.reader import TeacherCache


@dataclass(frozen=True)
class RunPlan:
    """What a :class:`RunConfig` resolves to before any weights load."""

    config: RunConfig
    teacher_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    """The teacher's tokenizer: the data is tokenised with it and saved with the student."""
    teacher_cache: TeacherCache | None
    """Stored teacher targets (``model.teacher_cache``), checked against the teacher's config,
    tokenizer, block size and temperature; None for a live teacher."""
    prepared_dir: Path
    """Where ``data.sources`` are tokenised to."""


def plan_run(config: RunConfig) -> RunPlan:
    """Check ``config`` against the teacher's (and a given student's) config and tokenizer."""
    teacher_cfg = model_config(config.model.teacher)
    tokenizer = load_tokenizer(config.model.teacher)
    cache = open_teacher_cache(config, teacher_cfg, tokenizer) if config.model.teacher_cache is not None else None
    student_cfg = None
    if config.model.student is not None:
        student_cfg = model_config(config.model.student)
        check_shared_tokenizer(config, teacher_cfg, student_cfg, tokenizer)
    check_block_size(config, {"teacher": teacher_cfg, "student": student_cfg})
    if config.loss.needs_layers:
        check_alignment_request(config, teacher_cfg, student_cfg)
    if config.model.student is None:
        check_cut_request(config, teacher_cfg)
    return RunPlan(config, teacher_cfg, tokenizer, cache, prepared_dir(config, tokenizer))


def open_teacher_cache(config: RunConfig, teacher_cfg: PretrainedConfig,
                       tokenizer: PreTrainedTokenizerBase) -> TeacherCache:
    """The run's teacher cache, checked against the teacher's config and tokenizer, the block
    size and the temperature (all cheap: headers, configs, tokenizer files)."""
    assert config.model.teacher_cache is not None
    check_teacher_cache_settings(config)
    cache = TeacherCache(config.model.teacher_cache, split="train")
    cache.check(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                teacher_config_fingerprint=config_fingerprint(teacher_cfg), block_size=config.data.block_size,
                temperature=config.loss.temperature, teacher=config.model.teacher)
    return cache


def check_shared_tokenizer(config: RunConfig, teacher_cfg: PretrainedConfig, student_cfg: PretrainedConfig,
                           tokenizer: PreTrainedTokenizerBase) -> None:
    """Logit distillation compares distributions over one vocabulary: a given student must
    share the teacher's tokenizer."""
    teacher, student = config.model.teacher, config.model.student
    if getattr(teacher_cfg, "vocab_size", None) != getattr(student_cfg, "vocab_size", None):
        raise ConfigError(
            f"teacher {teacher} and student {student} have different vocabularies "
            f"({teacher_cfg.vocab_size} vs {student_cfg.vocab_size} tokens): logit distillation needs a shared "
            f"tokenizer. Cut a student from the teacher (leave model.student empty) or pick one that shares it."
        )
    if tokenizer.get_vocab() != load_tokenizer(student).get_vocab():
        raise ConfigError(
            f"teacher {teacher} and student {student} tokenizers map tokens to different "
            f"ids: logit distillation needs the same tokenizer. Pick a student trained with the teacher's tokenizer."
        )


def check_block_size(config: RunConfig, configs: dict[str, PretrainedConfig | None]) -> None:
    for role, model_cfg in configs.items():
        context = config_context_length(model_cfg) if model_cfg is not None else None
        if context is not None and config.data.block_size > context:
            raise ConfigError(
                f"config value data.block_size: {config.data.block_size} exceeds the {role}'s context of {context} "
                f"tokens; set data.block_size={context} or less"
            )


def check_alignment_request(config: RunConfig, teacher_cfg: PretrainedConfig,
                            student_cfg: PretrainedConfig | None) -> None:
    """``loss.align_*`` against the student's depth (its real layer map comes with its weights)."""
    if student_cfg is not None:
        aligned_layers(config, getattr(student_cfg, "lmdistill_layer_map", None), config_num_layers(student_cfg))
    elif config.model.random_init:
        aligned_layers(config, None, 0)
    else:
        depth = (len(config.model.layers) if config.model.layers is not None
                 else student_depth(config_num_layers(teacher_cfg), config.model.num_layers))
        aligned_layers(config, list(range(depth)), depth)  # indices only: the real map comes later


def check_cut_request(config: RunConfig, teacher_cfg: PretrainedConfig) -> None:
    """Range checks of the layers and widths to keep (importance and search need the teacher's
    weights; these need only its config)."""
    m = config.model
    try:
        check_layer_request(config_num_layers(teacher_cfg), m.layers, m.num_layers,
                            resolve_strategy(m.strategy, teacher_cfg))
    except ValueError as err:
        field = "model.layers" if m.layers is not None else "model.num_layers"
        raise ConfigError(f"config value {field}: {err}") from None
    depth = len(m.layers) if m.layers is not None else student_depth(config_num_layers(teacher_cfg), m.num_layers)
    resolve_width(teacher_cfg, m, depth)


def aligned_layers(config: RunConfig, layer_map: list[int] | None, num_student: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for intermediate-layer alignment.

    Student layer ``i`` is aligned with teacher layer ``layer_map[i + 1] - 1``: the residual
    stream the teacher hands to the layer that student layer ``i + 1`` was copied from, which
    is what that layer reads in the student too. Where teacher layers were cut between the two,
    this asks student layer ``i`` to do their work as well; pairing it with its own copy
    (``layer_map[i]``) would hold it to what it did in the teacher and train nothing to stand
    in for the cut layers. Without a cut between them (width-only students) both are the same.
    The last student layer is left to ``loss.cos``/``loss.mse``: its HF hidden state is after
    the final norm, and so is comparable only with the teacher's last.
    """
    if layer_map is None:
        raise ConfigError(
            "config values loss.align_cos/loss.align_mse need a student cut from the teacher (its config.json records "
            "lmdistill_layer_map, the teacher layer each student layer came from); set them to 0 for a pretrained "
            "or randomly initialised student"
        )
    chosen = config.loss.align_layers if config.loss.align_layers is not None else list(range(num_student - 1))
    bad = [i for i in chosen if not 0 <= i < num_student - 1]
    if bad:
        raise ConfigError(
            f"config value loss.align_layers: student layer {bad[0]} cannot be aligned; choose among 0..{num_student - 2} "
            f"(the student has {num_student} layers; the last one's output is aligned by loss.cos and loss.mse)"
        )
    if not chosen:
        raise ConfigError("config values loss.align_cos/loss.align_mse: a 1-layer student has no intermediate layer "
                          "to align; set them to 0")
    return [(i, layer_map[i + 1] - 1) for i in chosen]


def prepared_dir(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    if config.data.prepared_dir:
        return Path(config.data.prepared_dir)
    return default_prepared_dir(config.data.sources, tokenizer)


def default_prepared_dir(sources: list[str], tokenizer: PreTrainedTokenizerBase) -> Path:
    """The cache folder that ``data.sources`` are prepared into when ``data.prepared_dir`` is unset."""
    key = hashlib.sha256(json.dumps([sources, tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    return cache_dir() / "data" / key


def prepare_sources(tokenizer: PreTrainedTokenizerBase, sources: list[str], tokenizer_name: str) -> PreparedData:
    """``sources`` prepared (every split) into the cache folder ``distill`` would use for them, so
    that ``init-student``, ``generate-corpus`` and ``cache-teacher`` share distill's tokens."""
    return prepare(tokenizer, sources, default_prepared_dir(sources, tokenizer), tokenizer_name=tokenizer_name)
