"""The student's model card: ``README.md`` in the Hugging Face model-card format.

Every student folder lmdistill writes (``init-student``, ``distill``, the demo) gets a card: YAML
front matter that the hub reads (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``,
``datasets`` when the data came from the hub, and a ``model-index`` once the student has been
scored), then how the student was made, how it scores and runs beside its teacher, what it is
for, and how to make it again. The facts behind the card (:class:`CardFacts`) are kept beside it
in ``lmdistill_card.json``, so that ``lmdistill eval --card`` and the demo can add their results
and write the card again; the card is always rendered from the facts, never edited in place.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import __version__
from .atomic import write_text_atomic
from .errors import LmdistillError
from .evaluate.results import format_eval
from .markdown import finite, get, join, number
from .measure.bench import format_bench
from .models.arch import config_num_layers, count_parameters
from .models.bundled import MODEL_ALIASES
from .models.load import hub_identity, model_config

CARD_FILE = "README.md"
FACTS_FILE = "lmdistill_card.json"
FACTS_VERSION = 1
TAGS = ["distillation", "lmdistill"]


class CardError(LmdistillError):
    """A folder whose card cannot be updated; the message names the fix."""


@dataclass
class CardFacts:
    """Everything a student's card says, as JSON-able values."""

    teacher: str
    """The teacher as it was given (hub id, folder, .gguf file or alias)."""
    base_model: str | None
    """The teacher's hub id (the card's ``base_model``); None for a teacher that has none."""
    teacher_parameters: int
    teacher_layers: int
    student_parameters: int
    shape: dict[str, int]
    """The student's layers, hidden size, MLP size, heads and key/value heads (config names)."""
    layers: list[int] | None
    """The teacher layers the student's layers were copied from; None for fresh or pretrained weights."""
    initialisation: str
    """How the student's weights were set before distillation, in words."""
    command: str
    """The command that made the folder."""
    license: str | None = None
    training: dict[str, Any] | None = None
    """How it was distilled (:func:`training_facts`); None for a student only cut so far."""
    config: dict[str, Any] | None = None
    """The run's whole config, to make it again."""
    evaluation: dict[str, Any] | None = None
    """``{"result": an evaluation result, "student": row label, "teacher": row label or None}``."""
    bench: dict[str, Any] | None = None
    """A bench result (generation speed) with the student and, first, the teacher."""
    version: int = FACTS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CardFacts:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_card(folder: Path, facts: CardFacts, name: str | None = None) -> None:
    """Write ``facts`` and the card rendered from them into ``folder`` (each file atomically);
    ``name`` titles the card (default :func:`card_name` of the folder)."""
    write_text_atomic(folder / FACTS_FILE, json.dumps(facts.to_dict(), indent=2) + "\n")
    write_text_atomic(folder / CARD_FILE, render_card(facts, name or card_name(folder)))


def card_name(folder: Path) -> str:
    """A card's title: the folder's name, or its run's for a run's ``student`` / ``student_init``."""
    folder = Path(folder).absolute()
    if folder.name in ("student", "student_init"):
        return folder.parent.name + ("-init" if folder.name == "student_init" else "")
    return folder.name


def read_facts(folder: Path) -> CardFacts:
    """The card facts of a student folder lmdistill wrote."""
    path = folder / FACTS_FILE
    if not path.is_file():
        raise CardError(f"{folder} has no {FACTS_FILE}: only student folders written by lmdistill (init-student, "
                        f"distill, demo) carry a card it can update; score other models without --card")
    try:
        return CardFacts.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise CardError(f"{path} is not a card record lmdistill can read ({err}); delete it and the card, or "
                        f"write the student again") from err


def add_results(folder: Path, evaluation: dict[str, Any] | None = None, bench: dict[str, Any] | None = None,
                command: str | None = None) -> CardFacts:
    """The folder's card with new evaluation and/or bench results (replacing older ones), rewritten."""
    facts = read_facts(folder)
    if evaluation is not None:
        facts.evaluation = evaluation
    if bench is not None:
        facts.bench = bench
    if command is not None:
        facts.command = command
    write_card(folder, facts)
    return facts


def student_facts(teacher_spec: str, student: PreTrainedModel, command: str, student_spec: str | None = None,
                  training: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> CardFacts:
    """The facts of a student's card: the pair's sizes and shapes, how the student was initialised
    (``student_spec``: the pretrained student it started from, if any) and, for a distilled one,
    ``training`` (:func:`training_facts`) and the run's ``config``."""
    base_model, license_id = hub_identity(teacher_spec)
    teacher_parameters, teacher_layers = model_size(teacher_spec)
    return CardFacts(teacher=teacher_spec, base_model=base_model, license=license_id,
                     teacher_parameters=teacher_parameters, teacher_layers=teacher_layers,
                     student_parameters=count_parameters(student), shape=model_shape(student.config),
                     layers=getattr(student.config, "lmdistill_layer_map", None),
                     initialisation=describe_initialisation(student.config, student_spec), command=command,
                     training=training, config=config)


def model_size(spec: str) -> tuple[int, int]:
    """Parameters and decoder layers of a MODEL argument, from its config alone (no weights read:
    the model is built on the meta device)."""
    config = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model), config_num_layers(config)


def current_command(default: str) -> str:
    """The command line running now when it is lmdistill's own CLI, else ``default``."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program == "lmdistill" or sys.argv[0].endswith(("lmdistill/__main__.py", "-m")):
        return shlex.join(["lmdistill", *sys.argv[1:]])
    return default


def model_shape(config: Any) -> dict[str, int]:
    """Depth and widths of a causal LM's config, under one set of names for every family."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if intermediate is None and hidden and getattr(config, "model_type", "") == "gpt2":
        intermediate = 4 * hidden  # GPT-2's n_inner None means 4 x n_embd
    shape = {"layers": config_num_layers(config), "hidden_size": hidden, "intermediate_size": intermediate,
             "attention_heads": getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None),
             "key_value_heads": getattr(config, "num_key_value_heads", None)}
    return {k: int(v) for k, v in shape.items() if v}


def describe_initialisation(config: Any, student_spec: str | None = None) -> str:
    """How a student's weights were set before distillation, from what its config records
    (``student_spec``: the pretrained student a run started from)."""
    if getattr(config, "lmdistill_teacher_layers", None) is None:
        return f"the pretrained model `{student_spec}`" if student_spec else "its own weights (not cut by lmdistill)"
    layers = getattr(config, "lmdistill_layer_map", None)
    text = "random weights in the cut architecture" if layers is None else f"teacher layers {layers}"
    choice = getattr(config, "lmdistill_layer_choice", None)
    if layers is not None and isinstance(choice, dict):
        text += f", chosen by {choice.get('strategy')} on {choice.get('calibration_tokens', 0):,} calibration tokens"
    width = getattr(config, "lmdistill_width_choice", None)
    if isinstance(width, dict) and not width.get("random_init"):
        text += (f"; MLP neurons and attention heads kept by activation importance on "
                 f"{width.get('calibration_tokens', 0):,} calibration tokens")
    return f"`{student_spec}`, cut by lmdistill: {text}" if student_spec else text


def training_facts(config: Any, summary: dict[str, Any], hardware: str, precision: str) -> dict[str, Any]:
    """How a run distilled its student, in words and numbers (``config``: its RunConfig;
    ``summary``: its summary; ``precision``: how it computed, in words)."""
    loss, train = config.loss, config.train
    terms = [f"{loss.kl:g} x {loss.divergence} at temperature {loss.temperature:g} (x T^2)" if loss.kl else None,
             f"{loss.ce:g} x cross-entropy" if loss.ce else None,
             f"{loss.cos:g} x cosine on the last hidden state" if loss.cos else None,
             f"{loss.mse:g} x MSE on the last hidden state" if loss.mse else None,
             f"{loss.align_cos:g} x cosine on aligned layers" if loss.align_cos else None,
             f"{loss.align_mse:g} x MSE on aligned layers" if loss.align_mse else None]
    soft = "a stored teacher cache" if config.model.teacher_cache else "the live teacher"
    if config.model.teacher_correction_tokens:
        soft += f", fine-tuned first on {config.model.teacher_correction_tokens:,} training tokens (teacher correction)"
    seconds = summary.get("train_seconds")
    minutes = f", {seconds / 60:.1f} minutes" if finite(seconds) else ""
    return {"loss": " + ".join(t for t in terms if t) + f"; soft targets from {soft}",
            "data": ", ".join(config.data.sources) + f" (train split, blocks of {config.data.block_size} tokens)",
            "sources": list(config.data.sources),
            "training": (f"{summary.get('step', 0):,} steps, {summary.get('tokens_seen', 0):,} tokens{minutes}; "
                         f"batch {train.batch_size} x {train.grad_accum}, AdamW lr {train.lr:g} ({train.schedule}), "
                         f"clipping at {train.max_grad_norm:g}"),
            "precision": precision, "hardware": hardware,
            "tokens_seen": summary.get("tokens_seen"), "steps": summary.get("step"), "train_seconds": seconds,
            "validation_perplexity": summary.get("val_ppl"), "lmdistill": __version__}


# ---------------------------------------------------------------------------------------
# Front matter


def front_matter(facts: CardFacts, name: str) -> dict[str, Any]:
    """The card's metadata, as the hub reads it."""
    meta: dict[str, Any] = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
    if facts.license:
        meta["license"] = facts.license
    meta |= {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(TAGS)}
    datasets = [s.removeprefix("hf:").split(":")[0] for s in get(facts.training, "sources") or [] if s.startswith("hf:")]
    if datasets:
        meta["datasets"] = datasets
    results = model_index_results(facts)
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def model_index_results(facts: CardFacts) -> list[dict[str, Any]]:
    """The student's scores as ``model-index`` results: one per task, its headline metric."""
    result, student = get(facts.evaluation, "result"), get(facts.evaluation, "student")
    rows = {r.get("model"): r for r in get(result, "models") or [] if isinstance(r, dict)}
    out = []
    for task in get(result, "tasks") or []:
        metrics = task.get("metrics") or []
        value = get(rows.get(student), "tasks", task.get("label"), metrics[0]) if metrics else None
        if not finite(value):
            continue
        options = task.get("options") or {}
        dataset = {"name": task["label"], "type": _dataset_type(task.get("name", ""), options)}
        if options.get("split"):
            dataset["split"] = options["split"]
        metric = {"type": metrics[0], "value": round(float(value), 4), "name": f"{task['label']} {metrics[0]}"}
        out.append({"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset,
                    "metrics": [metric]})
    return out


def _dataset_type(task_name: str, options: dict[str, str]) -> str:
    if "corpus" in options:
        return f"lmdistill-corpus:{options['corpus']}"
    return options.get("source") or task_name


# ---------------------------------------------------------------------------------------
# Body


def render_card(facts: CardFacts, name: str) -> str:
    """The whole card: front matter, then the sections."""
    meta = yaml.safe_dump(front_matter(facts, name), sort_keys=False, allow_unicode=True, width=1000)
    return "---\n" + meta + "---\n\n" + join([
        f"# {name}", "", _summary(facts), "",
        "## How it was made", "", *_made(facts), "",
        *_evaluation(facts), *_speed(facts),
        "## Intended use and limitations", "", _limits(facts), "",
        "## How to use", "", *_usage(name), "",
        "## Make it again", "", *_again(facts),
    ])


def _summary(facts: CardFacts) -> str:
    share = facts.student_parameters / facts.teacher_parameters if facts.teacher_parameters else float("nan")
    state = "distilled" if facts.training else "cut (not yet distilled)"
    teacher = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else f"`{facts.teacher}`"
    return (f"This {facts.student_parameters / 1e6:.1f}M-parameter model is a student of {teacher}, {state} with "
            f"lmdistill: {facts.shape.get('layers', '?')} decoder layers against the "
            f"teacher's {facts.teacher_layers}, {number(share, '.0%')} of its {facts.teacher_parameters / 1e6:.1f}M "
            "parameters. It loads with `AutoModelForCausalLM` and uses the teacher's tokenizer.")


def _made(facts: CardFacts) -> list[str]:
    shape = ", ".join(f"{k} {v}" for k, v in facts.shape.items())
    rows = [["teacher", teacher_description(facts)],
            ["student shape", shape],
            ["initialised from", facts.initialisation]]
    training = facts.training or {}
    rows += [[key, training[key]] for key in ("loss", "data", "training", "precision", "hardware") if training.get(key)]
    if training.get("lmdistill"):
        rows.append(["lmdistill", training["lmdistill"]])
    return ["| | |", "|---|---|", *(f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows)]


def teacher_description(facts: CardFacts) -> str:
    alias = MODEL_ALIASES.get(facts.teacher)
    if alias is not None:
        return (f"`{facts.teacher}`: {alias.hub_id or 'a model'} as the `{alias.filename}` file of the `{alias.package}` package, "
                "dequantised to float32")
    return f"`{facts.teacher}`" + (f" ({facts.base_model})" if facts.base_model and facts.base_model != facts.teacher else "")


def _evaluation(facts: CardFacts) -> list[str]:
    result = get(facts.evaluation, "result")
    if not isinstance(result, dict):
        return []
    lines = ["## Evaluation", "", *format_eval(result), ""]
    ratios = perplexity_ratios(facts)
    if ratios:
        lines += ["Student / teacher perplexity: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + ".", ""]
    return lines


def perplexity_ratios(facts: CardFacts) -> dict[str, float]:
    """Student over teacher perplexity per perplexity task, where both were scored together."""
    result = get(facts.evaluation, "result")
    student, teacher = get(facts.evaluation, "student"), get(facts.evaluation, "teacher")
    rows = {r.get("model"): r for r in get(result, "models") or [] if isinstance(r, dict)}
    ratios = {}
    for task in get(result, "tasks") or []:
        label = task.get("label")
        s, t = (get(rows.get(m), "tasks", label, "perplexity") for m in (student, teacher))
        if finite(s) and finite(t) and t > 0:
            ratios[str(label).removeprefix("ppl ")] = s / t
    return ratios


def _speed(facts: CardFacts) -> list[str]:
    if not isinstance(facts.bench, dict):
        return []
    return ["## Size and speed", "", *format_bench(facts.bench), ""]


def _limits(facts: CardFacts) -> str:
    seen = get(facts.training, "tokens_seen")
    data = get(facts.training, "data")
    trained = (f"It was distilled on {seen:,} tokens of {data}; on text unlike that data it falls further behind "
               "its teacher than its scores on that data show." if finite(seen) and data
               else "It has not been distilled yet: a cut teacher scores far worse than its teacher until it is.")
    return (f"A research and engineering artefact: a smaller, faster stand-in for its teacher where the teacher's "
            f"quality is not needed, and a starting point for further distillation. {trained} It inherits its teacher's "
            "limits and biases (and its licence), knows less than the teacher, and should not be relied on for "
            "facts or for safety-relevant decisions.")


def _usage(name: str) -> list[str]:
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'MODEL = "{name}"  # this folder\'s path, or its hub id once uploaded',
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            "model = AutoModelForCausalLM.from_pretrained(MODEL)",
            'ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))", "```"]


def _again(facts: CardFacts) -> list[str]:
    lines = ["```bash", facts.command, "```"]
    if facts.config:
        config = yaml.safe_dump(facts.config, sort_keys=False, width=1000).rstrip("\n")
        lines += ["", "The run's config (`lmdistill distill --config config.yaml --out RUN` trains it again):", "",
                  "```yaml", config, "```"]
    return lines
