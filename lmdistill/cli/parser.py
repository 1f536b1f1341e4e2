"""The ``lmdistill`` argument parser: one sub-parser per command, each bound to its function."""

from __future__ import annotations

import argparse

from ..config import LAYER_STRATEGIES, SEARCH_OBJECTIVES, ModelConfig
from .args import (
    DEFAULT_TAIL_SAMPLES,
    Parser,
    int_at_least,
    model_field,
    number,
    parse_layers,
    parse_temperatures,
)
from .commands import (
    cmd_bench,
    cmd_cache_teacher,
    cmd_demo,
    cmd_distill,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_generate_corpus,
    cmd_init_student,
    cmd_prepare,
    cmd_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmdistill", description="Distil a causal language model into a smaller, faster student.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenise text sources into token shards")
    p.add_argument("--tokenizer", required=True, help="MODEL whose tokenizer to use (alias, .gguf, folder, hub id)")
    p.add_argument("--source", nargs="+", required=True, help="corpus:austen|moby_dick|sotu|all, a .txt/.jsonl/.jsonl.xz/.parquet file or folder, hf:NAME[:CONFIG]")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.set_defaults(parser=p, func=cmd_prepare)

    model = ModelConfig()
    p = sub.add_parser("init-student", help="cut a student from a teacher",
                       description="Cut a student from a teacher, as distill does. --teacher, --layers, --num-layers, "
                                   "--strategy, --calibration-tokens, --search-objective, --intermediate-size, "
                                   "--num-attention-heads, --num-key-value-heads, --params and --random-init set the "
                                   "model.* fields of the same names in a distill recipe, with their defaults "
                                   "and checks; distill calibrates on its training data instead of --calibration.")
    p.add_argument("--teacher", required=True, type=model_field("teacher"), help="teacher MODEL")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", type=model_field("layers", parse_layers), default=model.layers,
                       help="teacher layers to keep, e.g. 0,2,4,7,9,11")
    group.add_argument("--num-layers", type=model_field("num_layers"), default=model.num_layers,
                       help="student depth (default: half the teacher's)")
    p.add_argument("--strategy", type=model_field("strategy"), default=model.strategy, choices=LAYER_STRATEGIES,
                   help="layer map for --num-layers: importance keeps the layers of largest block influence, search "
                        "removes one at a time the layer that costs least, auto is importance for Llama-family "
                        f"teachers and every-other otherwise (default: {model.strategy})")
    p.add_argument("--calibration", default="corpus:all",
                   help="for importance, search and width pruning: text source (its train split, prepared as distill "
                        "prepares it; the calibration blocks are spread over it)")
    p.add_argument("--calibration-tokens", type=model_field("calibration_tokens"), default=model.calibration_tokens,
                   help="for importance, search and width pruning: tokens measured (search costs about n^2/2 "
                        f"forward passes over them; default {model.calibration_tokens})")
    p.add_argument("--search-objective", type=model_field("search_objective"), default=model.search_objective,
                   choices=SEARCH_OBJECTIVES,
                   help="for search: keep KL to the teacher (kl) or calibration cross-entropy (ce) lowest "
                        f"(default: {model.search_objective})")
    p.add_argument("--intermediate-size", type=model_field("intermediate_size"), default=model.intermediate_size,
                   help="width pruning: MLP neurons each layer keeps, ranked by mean |activation| on the calibration "
                        "tokens (default: the teacher's)")
    p.add_argument("--num-attention-heads", type=model_field("num_attention_heads"), default=model.num_attention_heads,
                   help="width pruning (Llama family): query heads each layer keeps, the same number in every "
                        "key/value group, ranked by output norm (default: the teacher's heads per group times "
                        "--num-key-value-heads)")
    p.add_argument("--num-key-value-heads", type=model_field("num_key_value_heads"), default=model.num_key_value_heads,
                   help="width pruning (Llama family): key/value groups each layer keeps, ranked by their heads' "
                        "summed output norm (default: the teacher's)")
    p.add_argument("--params", type=model_field("params"), default=model.params,
                   help="target size such as 81.4M: the largest --intermediate-size whose student, at this depth and "
                        "these heads, has at most this many parameters (the chosen shape is printed)")
    p.add_argument("--random-init", action="store_true", default=model.random_init,
                   help="random weights with the cut architecture")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", required=True, help="output HF folder")
    p.set_defaults(parser=p, func=cmd_init_student)

    p = sub.add_parser("cache-teacher", help="run the teacher once over prepared token shards and store its top-k logits",
                       description="Stores, per position of the training blocks, the teacher's top-k logits, their "
                                   "token ids, the log-sum-exp at each temperature and ids drawn from the teacher's "
                                   "distribution outside the top-k (tail samples), for lmdistill distill "
                                   "--teacher-cache. A killed run continues where it stopped when rerun. See "
                                   "docs/teacher_cache.md.")
    p.add_argument("--teacher", required=True, help="teacher MODEL (the distill run's model.teacher)")
    p.add_argument("--data", nargs="+", required=True,
                   help="a prepared folder (lmdistill prepare --out), or text sources prepared as distill would")
    p.add_argument("--top-k", type=int_at_least(1), required=True, help="logits kept per position (the vocabulary size keeps all)")
    p.add_argument("--temperatures", type=parse_temperatures, default=[2.0],
                   help="comma-separated temperatures distill may use (loss.temperature), e.g. 1,2 (default 2)")
    p.add_argument("--block-size", type=int_at_least(1), required=True, help="the distill run's data.block_size")
    p.add_argument("--out", required=True, help="cache folder (model.teacher_cache / distill --teacher-cache)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"],
                   help="split to cache (distill reads train)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="blocks per teacher forward (and per resumable chunk)")
    p.add_argument("--tail-samples", type=int, default=None,
                   help=f"ids drawn per position from the teacher's distribution outside its top-k, at each temperature, "
                        f"so that the tail's gradient is unbiased (default {DEFAULT_TAIL_SAMPLES}; 0 keeps only the tail "
                        f"bucket; see docs/teacher_cache.md)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="storage of the top-k logits")
    p.add_argument("--rank", type=int_at_least(0), default=0, help="this process's part (0..world-size-1)")
    p.add_argument("--world-size", type=int_at_least(1), default=1, help="processes sharing the work, each writing its own part")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(parser=p, func=cmd_cache_teacher)

    p = sub.add_parser("generate-corpus", help="sample the teacher's own text into a corpus that distill reads",
                       description="Sample continuations from the teacher (unconditional, or after prompt windows "
                                   "from --prompts) into JSON-lines parts in --out, a local source for "
                                   "data.sources (sequence-level distillation). Seeded per batch: a killed run "
                                   "continues where it stopped when rerun, and a larger --tokens extends the corpus.")
    p.add_argument("--teacher", required=True, help="teacher MODEL")
    p.add_argument("--tokens", type=int_at_least(1), required=True, help="stop once the corpus holds this many new tokens")
    p.add_argument("--out", required=True, help="corpus folder (created, or extended with the same settings)")
    p.add_argument("--prompts", help="SOURCE whose train split gives prompt windows (default: unconditional samples)")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=32, help="tokens per prompt window (with --prompts)")
    p.add_argument("--new-tokens", type=int_at_least(1), default=256, help="tokens sampled per row (a sampled end-of-document starts a new document)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="rows sampled together (one part file each batch)")
    p.add_argument("--temperature", type=number("a number > 0", lambda v: v > 0), default=1.0)
    p.add_argument("--top-p", type=number("a number in (0, 1]", lambda v: 0 < v <= 1), default=0.95,
                   help="nucleus sampling (default 0.95: trims the tail a small model samples into noise; 1 keeps "
                        "the teacher's distribution)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the teacher's weights while sampling (auto: bf16 where the hardware computes it natively)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(parser=p, func=cmd_generate_corpus)

    p = sub.add_parser("distill", help="train a student from a recipe, or resume a run",
                       description="Train a student from a recipe, or resume a run. On several GPUs or nodes, launch it "
                                   "with torchrun: torchrun --nproc-per-node N -m lmdistill distill ... (DDP by default, "
                                   "train.distributed=fsdp shards the student; see docs/distributed.md).")
    p.add_argument("--config", help="recipe YAML (or bundled name: distilgpt2, smollm2-demo)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help="train against stored teacher targets (lmdistill cache-teacher); same as model.teacher_cache=DIR")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*",
                   help="section.field=value, e.g. train.max_steps=200 (before, between or after the options)")
    p.set_defaults(parser=p, func=cmd_distill)

    p = sub.add_parser("eval", help="evaluate one or more models side by side on named tasks",
                       description="Tasks: ppl:corpus=all:split=test, ppl:source=FILE, wikitext:path=DIR, ptb:path=DIR, "
                                   "enwik8:path=FILE, text8:path=FILE, lambada:path=FILE, hellaswag:path=FILE, lastword. "
                                   "Options follow the name as :key=value (window, stride, max_tokens, split, max_docs, ...).")
    p.add_argument("models", nargs="+", help="MODELs to evaluate, one table row each")
    p.add_argument("--task", action="append", help="TASK[:key=value...] (repeatable); default: ppl:corpus=all:split=test")
    p.add_argument("--data", nargs="+", help="shorthand: perplexity on these text sources (corpus:all is one task per corpus)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split for --data")
    p.add_argument("--window", type=int_at_least(2), default=None, help="for --data: tokens per forward pass (default 512)")
    p.add_argument("--stride", type=int_at_least(1), default=None, help="for --data: new tokens scored per window (default: the window)")
    p.add_argument("--max-tokens", type=int_at_least(2), default=None, help="for --data: score only the first N tokens of each source")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="windows or requests per forward pass")
    p.add_argument("--json", help="also write the full results (protocols, counts, metrics, times) as JSON")
    p.add_argument("--card", action="store_true",
                   help="write the results into the model card (README.md) of each MODEL that is a student folder "
                        "lmdistill wrote; the teacher's scores go beside them when its MODEL is evaluated too")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(parser=p, func=cmd_eval)

    p = sub.add_parser("generate", help="continue prompts (from --prompt or stdin)")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one prompt per stdin line")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--temperature", type=number("a number >= 0 (0: greedy)", lambda v: v >= 0), default=0.0,
                   help="0 for greedy")
    p.add_argument("--top-k", type=int_at_least(1), default=None)
    p.add_argument("--top-p", type=number("a number in (0, 1]", lambda v: 0 < v <= 1), default=None)
    p.add_argument("--repetition-penalty", type=number("a number > 0 (1: off)", lambda v: v > 0), default=1.0)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--compare", metavar="MODEL2", help="also continue each prompt with MODEL2 and compare speeds")
    p.set_defaults(parser=p, func=cmd_generate)

    p = sub.add_parser("bench", help="parameters, size, memory and speed of several models, measured interleaved")
    p.add_argument("models", nargs="+", help="MODELs sharing one tokenizer; speed-ups are relative to the first")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=128, help="prompt length for generation and prefill")
    p.add_argument("--new-tokens", type=int_at_least(1), default=128, help="tokens generated at batch 1 (greedy, KV cache)")
    p.add_argument("--repeats", type=int_at_least(1), default=5, help="timed repeats per measurement (median and spread)")
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed runs first")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="batched forward throughput: sequences")
    p.add_argument("--seq-len", type=int_at_least(1), default=256, help="batched forward throughput: tokens per sequence")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", help="also write the full results as JSON")
    p.set_defaults(parser=p, func=cmd_bench)

    p = sub.add_parser("report", help="report.md with plots for a run directory (finished, running or interrupted)")
    p.add_argument("run_dir", help="the run directory (lmdistill distill --out)")
    p.add_argument("--eval", help="include an `lmdistill eval --json` file (default: RUN_DIR/eval.json if present)")
    p.add_argument("--bench", help="include an `lmdistill bench --json` file (default: RUN_DIR/bench.json if present)")
    p.set_defaults(parser=p, func=cmd_report)

    p = sub.add_parser("export", help="write a model (a student folder) as a GGUF file for llama.cpp and Ollama",
                       description="Write MODEL as one GGUF file with its tokenizer (Llama-family and GPT-2 models). "
                                   "f32 keeps every weight; f16 and q8_0 store the matrices in 16 or about 8.5 bits "
                                   "(norms and biases stay float32).")
    p.add_argument("model", help="MODEL: a student folder (or any Llama-family or GPT-2 HF folder or hub id)")
    p.add_argument("--gguf", required=True, help="the GGUF file to write (.gguf)")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"], help="type of the weight matrices (default f16)")
    p.set_defaults(parser=p, func=cmd_export)

    p = sub.add_parser("demo", help="distil the bundled SmolLM2-135M into 15 layers and compare")
    p.add_argument("--minutes", type=number("a number of minutes > 0", lambda v: v > 0), default=10.0,
                   help="training time budget")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--eval-tokens", type=int_at_least(2), default=32768, help="test tokens scored per corpus")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.set_defaults(parser=p, func=cmd_demo)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; distill's ``section.field=value`` overrides may come anywhere.

    argparse takes one run of positionals for ``overrides`` and leaves any later run over, so
    the words left over that are not options are distill's further overrides (load_config then
    checks each one); anything else left over is an unknown argument.
    """
    args, extras = parser.parse_known_args(argv)
    overrides = [word for word in extras if not word.startswith("-")] if args.command == "distill" else []
    unknown = [word for word in extras if word not in overrides]
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args
