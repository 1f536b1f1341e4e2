"""Build a student from a teacher: same width, fewer layers, chosen teacher layers copied.

The student is a model of the teacher's own class whose config differs only in its layer
count; embeddings, position embeddings, final norm and lm_head are copied (tied where the
teacher ties) and decoder layer ``i`` of the student is a copy of teacher layer
``layer_map[i]``. The map is written into the student's ``config.json``
(``lmdistill_layer_map``) so later steps know which teacher layer each student layer came from.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.arch import architecture_of, decoder_layers
from ..models.errors import ModelError
from .maps import validate_layer_map


def build_student(teacher: PreTrainedModel, layers: list[int], random_init: bool = False, seed: int = 0) -> PreTrainedModel:
    """A student of the teacher's class with ``len(layers)`` decoder layers.

    With ``random_init`` the student keeps the cut architecture but gets fresh weights
    (the model's own initialiser, seeded).
    """
    arch = architecture_of(teacher)
    num_teacher = len(decoder_layers(teacher))
    layers = validate_layer_map(layers, num_teacher)
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        # A teacher read from a GGUF file is dequantised in memory; its student is plain weights.
        delattr(config, "quantization_config")
    setattr(config, arch.num_layers_key, len(layers))
    cut_per_layer_fields(config, layers)
    config.lmdistill_layer_map = None if random_init else list(layers)
    config.lmdistill_teacher_layers = num_teacher
    torch.manual_seed(seed)
    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)
    if random_init:
        return student.eval()

    teacher_state = teacher.state_dict()
    layers_prefix = arch.layers + "."
    new_state = {}
    for name in student.state_dict():
        if name.startswith(layers_prefix):
            index, rest = name[len(layers_prefix):].split(".", 1)
            source = f"{layers_prefix}{layers[int(index)]}.{rest}"
        else:
            source = name
        if source not in teacher_state:
            raise ModelError(f"student tensor {name} has no counterpart {source} in the teacher; report this model type")
        new_state[name] = teacher_state[source]  # load_state_dict copies
    student.load_state_dict(new_state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.eval()


def cut_per_layer_fields(config, layers: list[int]) -> None:
    # Some configs describe each layer (GPT-Neo's attention_types, Qwen's layer_types);
    # they must follow the layer map or the student would get the wrong attention kind.
    if hasattr(config, "attention_layers") and isinstance(config.attention_layers, list):
        config.attention_layers = [config.attention_layers[i] for i in layers]
        if hasattr(config, "attention_types"):
            config.attention_types = [[[kind], 1] for kind in config.attention_layers]
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]


def student_layer_map(student: PreTrainedModel) -> list[int] | None:
    """The teacher layers a student was cut from, as recorded in its config."""
    return getattr(student.config, "lmdistill_layer_map", None)


def check_shared_vocabulary(teacher: PreTrainedModel, student: PreTrainedModel,
                            teacher_tokenizer: PreTrainedTokenizerBase | None = None,
                            student_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Refuse a teacher/student pair whose logits do not index the same tokens."""
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    s_vocab = student.get_output_embeddings().weight.shape[0]
    if t_vocab != s_vocab:
        raise ModelError(
            f"teacher and student vocabularies differ ({t_vocab} vs {s_vocab} output tokens): logit "
            f"distillation needs the same tokenizer. Use a student built from this teacher "
            f"(lmdistill init-student) or a pretrained student that shares its tokenizer."
        )
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ModelError(
                "teacher and student tokenizers map tokens to different ids: logit distillation needs "
                "the same tokenizer. Pick a student that was trained with the teacher's tokenizer."
            )
