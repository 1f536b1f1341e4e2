"""The ``lmdistill`` command: thin subcommands over the library modules.

    lmdistill prepare       text sources -> token shards
    lmdistill init-student  cut a student from a teacher
    lmdistill cache-teacher store the teacher's top-k logits and tail samples over prepared token shards
    lmdistill distill       train a student (or --resume a run)
    lmdistill eval          perplexity of several models under one protocol
    lmdistill generate      continue a prompt (--compare MODEL2: side by side)
    lmdistill bench         size and speed of several models, measured interleaved
    lmdistill report        report.md with plots for a run directory
    lmdistill demo          the whole pipeline on the bundled teacher and corpora
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import LAYER_STRATEGIES, SEARCH_OBJECTIVES, ConfigError, ModelConfig
from .errors import LmdistillError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

# cache-teacher's tail samples per position and temperature. On the demo recipe (top-64, T=2)
# 256 kept the validation perplexity within 3% of the live teacher's at every evaluation and 64
# did not (docs/teacher_cache.md, "Measured").
DEFAULT_TAIL_SAMPLES = 256


class UsageError(LmdistillError):
    """Command-line arguments that cannot be used together or with these inputs; the message names
    the flags and the fix."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the tool."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ---------------------------------------------------------------------------------------
# Argument types: a bad number is refused while parsing, with the flag named by argparse.


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _number(requirement: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
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


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers such as 0,2,4,7,9,11, not {text!r}") from None


def _check_writable(target: Path, flag: str) -> None:
    """``target`` can be created: its nearest existing ancestor is a folder we may write in."""
    from .atomic import nearest_existing

    parent = nearest_existing(target.parent)
    if not parent.is_dir():
        raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: cannot write under {parent}; choose a path you can write to")


def _output_file(path: str | None, flag: str) -> Path | None:
    """Checked before the work starts, so a bad path cannot lose the results at the end."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; pass a file name such as {target / 'results.json'}")
    _check_writable(target, flag)
    return target


def _write_json(target: Path | None, results: dict) -> None:
    from .atomic import write_text_atomic

    if target is not None:
        write_text_atomic(target, json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Subcommands


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare
    from .data.sources import parse_source
    from .models.load import load_tokenizer

    for spec in args.source:
        parse_source(spec)  # fail on a bad source before loading the tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    data = prepare(tokenizer, args.source, Path(args.out), tokenizer_name=args.tokenizer)
    for split, count in data.splits.items():
        print(f"{split:>10}: {count:,} tokens")
    print(f"{'reused' if data.reused else 'wrote'} {data.out_dir}")
    return 0


def cmd_init_student(args: argparse.Namespace) -> int:
    from .models.arch import config_num_layers, count_parameters, decoder_layers
    from .models.load import load_model, load_tokenizer, model_config
    from .models.save import save_model
    from .student.cut import CALIBRATION_BLOCK_SIZE, cut_student
    from .student.maps import check_layer_request, resolve_strategy

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose another --out for the student folder")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} already exists and is not empty; choose another --out or delete it first")
    _check_writable(out, "--out")
    model = ModelConfig(**{name: getattr(args, name) for name in _INIT_STUDENT_FIELDS})
    teacher_config = model_config(model.teacher)
    check_layer_request(config_num_layers(teacher_config), model.layers, model.num_layers,
                        resolve_strategy(model.strategy, teacher_config))  # before loading weights
    tokenizer = load_tokenizer(model.teacher)
    teacher = load_model(model.teacher)
    cut = cut_student(teacher, model, lambda: _calibration(tokenizer, args.calibration, model.calibration_tokens),
                      block_size=CALIBRATION_BLOCK_SIZE, seed=args.seed, log=print)
    save_model(cut.student, tokenizer, out)
    t_params, s_params = count_parameters(teacher), count_parameters(cut.student)
    init = "random weights" if model.random_init else f"teacher layers {cut.layers}"
    print(f"teacher: {len(decoder_layers(teacher))} layers, {t_params / 1e6:.1f}M parameters")
    print(f"student: {len(cut.layers)} layers, {s_params / 1e6:.1f}M parameters ({s_params / t_params:.0%}), {init}")
    if cut.choice is not None:
        print(f"how the layers were chosen (every step and score): lmdistill_layer_choice in {out / 'config.json'}")
    print(f"wrote {out}")
    return 0


def _calibration(tokenizer: PreTrainedTokenizerBase, source: str, max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of ``source``'s train split, for a strategy that measures the teacher."""
    from .data.prepare import calibration_tokens

    tokens = calibration_tokens(tokenizer, source, max_tokens)
    print(f"calibration: {min(len(tokens), max_tokens):,} tokens of {source} (train split)")
    return tokens


# init-student's options that set the fields of the same names in a recipe's model section: their
# defaults, choices and checks are ModelConfig's.
_INIT_STUDENT_FIELDS = ("teacher", "layers", "num_layers", "strategy", "calibration_tokens", "search_objective",
                        "random_init")


def _model_field(name: str, parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """The argparse type of the option that sets ModelConfig field ``name``: ``parse`` reads the
    text, ModelConfig converts and checks the value, and argparse names the option in an error."""
    def read(text: str) -> Any:
        try:
            return ModelConfig.read_field(name, parse(text))
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return read


def _parse_temperatures(text: str) -> list[float]:
    try:
        temperatures = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers such as 1,2, not {text!r}") from None
    if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise argparse.ArgumentTypeError(f"takes temperatures > 0 such as 1,2 (loss.temperature of the distill run), "
                                         f"not {text!r}")
    return temperatures


def _flag(name: str, value: object) -> str:
    """A cache-teacher argument as its flag (for the builder's messages)."""
    return f"--{'dtype' if name == 'value_dtype' else name.replace('_', '-')} {value}"


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .data.errors import DataError
    from .data.prepare import load_prepared, prepare
    from .data.sources import parse_source
    from .models.arch import config_context_length
    from .models.device import resolve_device
    from .models.fingerprint import tokenizer_fingerprint
    from .models.load import load_model, load_tokenizer, model_config
    from .teacher_cache.build import build_teacher_cache, check_build_settings
    from .teacher_cache.format import part_name
    from .teacher_cache.reader import TeacherCache
    from .train.plan import default_prepared_dir

    # Cheap checks first: arguments against the teacher's config, then its tokenizer and the data.
    teacher_cfg = model_config(args.teacher)
    vocab = getattr(teacher_cfg, "vocab_size", None)
    tail_samples = args.tail_samples
    if tail_samples is None:  # no tail when every logit is kept
        tail_samples = 0 if vocab is not None and args.top_k >= vocab else DEFAULT_TAIL_SAMPLES
    check_build_settings(vocab, config_context_length(teacher_cfg), top_k=args.top_k, temperatures=args.temperatures,
                         block_size=args.block_size, tail_samples=tail_samples, value_dtype=args.dtype,
                         batch_size=args.batch_size, rank=args.rank, world_size=args.world_size, setting=_flag)
    tokenizer = load_tokenizer(args.teacher)
    fingerprint = tokenizer_fingerprint(tokenizer)
    folder = Path(args.data[0])
    if len(args.data) == 1 and (folder / "meta.json").is_file():
        data = load_prepared(folder)
        if data.fingerprint != fingerprint:
            raise DataError(f"{folder} was prepared with another tokenizer than {args.teacher}'s; prepare the text "
                            f"with lmdistill prepare --tokenizer {args.teacher}")
    else:
        for spec in args.data:
            parse_source(spec)  # fail on a bad source before tokenising
        data = prepare(tokenizer, args.data, default_prepared_dir(args.data, tokenizer), tokenizer_name=args.teacher)
    device = resolve_device(args.device)
    teacher = load_model(args.teacher, device=device)
    result = build_teacher_cache(
        teacher, data, Path(args.out), top_k=args.top_k, temperatures=args.temperatures, block_size=args.block_size,
        tokenizer_fingerprint=fingerprint, split=args.split, value_dtype=args.dtype, batch_size=args.batch_size,
        rank=args.rank, world_size=args.world_size, tail_samples=tail_samples)
    resumed = f" (continued from block {result.resumed_from:,})" if 0 < result.resumed_from < result.blocks_total else ""
    print(f"wrote {result.path}: {result.blocks_total:,} blocks{resumed}")
    waiting = [r for r in range(args.world_size)
               if not (Path(args.out) / part_name(args.split, r, args.world_size)).is_file()]
    if waiting:  # other processes still to finish their parts
        print(f"part {args.rank} of {args.world_size} done; the cache is usable once every part is (still missing: "
              f"{', '.join(map(str, waiting))})")
    else:  # every part present: open (and so verify) the whole cache; damage is an error
        print(f"complete: {TeacherCache(args.out, split=args.split).describe()}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.run import run_training

    if args.resume:
        if args.config or args.overrides or args.teacher_cache or args.out:
            given = [flag for flag, value in (("--config", args.config), ("--out", args.out),
                                              ("--teacher-cache", args.teacher_cache)) if value]
            given += [f"overrides ({' '.join(args.overrides)})"] if args.overrides else []
            raise UsageError(f"--resume continues a run with its saved config.yaml; drop {', '.join(given)}")
        summary = run_training(None, Path(args.resume), resume=True)  # type: ignore[arg-type]
    else:
        if not args.out:
            raise UsageError("distill needs --out RUN_DIR (or --resume RUN_DIR)")
        overrides = list(args.overrides) + ([f"model.teacher_cache={args.teacher_cache}"] if args.teacher_cache else [])
        config = load_config(args.config, overrides)
        summary = run_training(config, Path(args.out))
    return 0 if summary["finished"] else 130


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.results import format_eval
    from .evaluate.runner import evaluate_models
    from .evaluate.tasks import parse_tasks

    specs = list(args.task or [])
    for source in args.data or ([] if specs else ["corpus:all"]):
        # --data is shorthand for perplexity tasks sharing --split/--window/--stride/--max-tokens.
        where = f"corpus={source.removeprefix('corpus:')}" if source.startswith("corpus:") else f"source={source}"
        extra = "".join(f":{k}={v}" for k, v in (("window", args.window), ("stride", args.stride),
                                                   ("max_tokens", args.max_tokens)) if v is not None)
        specs.append(f"ppl:{where}:split={args.split}{extra}")
    tasks = [task for spec in specs for task in parse_tasks(spec)]
    target = _output_file(args.json, "--json")
    results = evaluate_models(args.models, tasks, batch_size=args.batch_size, device=args.device)
    print("\n".join(format_eval(results)))
    _write_json(target, results)
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, or one prompt per non-blank line of standard input."""
    if args.prompt:
        return args.prompt
    if sys.stdin.isatty():
        raise UsageError("give a prompt with --prompt TEXT, or pipe prompts on standard input (one per line)")
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UsageError("no prompt: standard input held no text; give --prompt TEXT, or pipe prompts on standard "
                         "input (one per line)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import SamplingConfig, check_prompt_fits, encode_prompt, generate
    from .measure.speed import REPEATS, WARMUP, generation_protocol, generation_speeds
    from .models.device import model_device, resolve_device
    from .models.fingerprint import tokenizer_fingerprint
    from .models.load import load_model, load_tokenizer

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    prompts = _prompts(args)
    device = resolve_device(args.device)
    specs = [args.model] + ([args.compare] if args.compare else [])
    tokenizers = [load_tokenizer(spec) for spec in specs]
    if len({tokenizer_fingerprint(t) for t in tokenizers}) > 1:
        print("note: the models use different tokenizers; speeds are in each model's own tokens", file=sys.stderr)
    models = [load_model(spec, device=device) for spec in specs]
    for model, tokenizer in zip(models, tokenizers):
        for prompt in prompts:  # every prompt fits every model before any output
            check_prompt_fits(model, tokenizer, prompt, args.max_new_tokens)
    for prompt in prompts:
        for spec, model, tokenizer in zip(specs, models, tokenizers):
            if args.compare:
                print(f"--- {spec}")
            print(prompt, end="", flush=True)
            generate(model, tokenizer, prompt, sampling, stream=lambda piece: print(piece, end="", flush=True))
            print()
        if args.compare:
            # The text above follows the sampling options; the speed is measured apart, by the one
            # protocol that bench and the demo use, on this prompt.
            ids = [torch.tensor([encode_prompt(t, prompt)], dtype=torch.long) for t in tokenizers]
            speeds = generation_speeds(models, ids, args.max_new_tokens, REPEATS, WARMUP)
            protocol = generation_protocol(args.max_new_tokens, REPEATS, WARMUP, model_device(models[0]),
                                           torch.get_num_threads(),
                                           prompt=f"the one above ({' / '.join(dict.fromkeys(str(i.shape[1]) for i in ids))} tokens)")
            base = speeds[0].tokens_per_second
            parts = ", ".join(f"{spec}: {s.new_tokens} tokens in {s.new_tokens / s.tokens_per_second:.2f} s of decode "
                              f"= {s.tokens_per_second:.1f} tokens/s ({s.tokens_per_second / base:.2f}x)"
                              for spec, s in zip(specs, speeds))
            print(f"--- speed ({protocol}): {parts}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .measure.bench import BenchConfig, bench_models, format_bench

    config = BenchConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                         warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    target = _output_file(args.json, "--json")
    results = bench_models(args.models, config)
    print("\n".join(format_bench(results)))
    _write_json(target, results)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.write import write_report

    extra = {}
    # Result kinds each option takes (files from before results carried a kind have none).
    kinds = {"eval_results": ("eval", "demo"), "bench_results": ("bench",)}
    for key, path in (("eval_results", args.eval), ("bench_results", args.bench)):
        if path:
            flag = "--eval" if key == "eval_results" else "--bench"
            try:
                extra[key] = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UsageError(f"{flag} {path}: cannot read it as JSON ({err}); pass the file written by "
                                 f"lmdistill {flag.removeprefix('--')} --json") from None
            if not isinstance(extra[key], dict):
                raise UsageError(f"{flag} {path} holds a JSON {type(extra[key]).__name__}, not the object that "
                                 f"lmdistill {flag.removeprefix('--')} --json writes; pass that file")
            kind = extra[key].get("kind")
            if kind is not None and kind not in kinds[key]:
                other = "--bench" if kind == "bench" else "--eval"
                raise UsageError(f"{flag} {path} holds the results of lmdistill {kind}; pass it with {other}")
    print(f"wrote {write_report(Path(args.run_dir), **extra)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    results = run_demo(Path(args.out), minutes=args.minutes, eval_tokens=args.eval_tokens, resume=args.resume)
    return 0 if results else 130


# ---------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmdistill", description="Distil a causal language model into a smaller, faster student.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenise text sources into token shards")
    p.add_argument("--tokenizer", required=True, help="MODEL whose tokenizer to use (alias, .gguf, folder, hub id)")
    p.add_argument("--source", nargs="+", required=True, help="corpus:austen|moby_dick|sotu|all, a .txt/.jsonl/.jsonl.xz/.parquet file or folder, hf:NAME[:CONFIG]")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.set_defaults(parser=p, func=cmd_prepare)

    model = ModelConfig()
    p = sub.add_parser("init-student", help="cut a student from a teacher",
                       description="Cut a student from a teacher, as distill does. --teacher, --layers, --num-layers, "
                                   "--strategy, --calibration-tokens, --search-objective and --random-init set the "
                                   "model.* fields of the same names in a distill recipe, with their defaults and "
                                   "checks; distill calibrates on its training data instead of --calibration.")
    p.add_argument("--teacher", required=True, type=_model_field("teacher"), help="teacher MODEL")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", type=_model_field("layers", _parse_layers), default=model.layers,
                       help="teacher layers to keep, e.g. 0,2,4,7,9,11")
    group.add_argument("--num-layers", type=_model_field("num_layers"), default=model.num_layers,
                       help="student depth (default: half the teacher's)")
    p.add_argument("--strategy", type=_model_field("strategy"), default=model.strategy, choices=LAYER_STRATEGIES,
                   help="layer map for --num-layers: importance keeps the layers of largest block influence, search "
                        "removes one at a time the layer that costs least, auto is importance for Llama-family "
                        f"teachers and every-other otherwise (default: {model.strategy})")
    p.add_argument("--calibration", default="corpus:all", help="for importance and search: text source (train split)")
    p.add_argument("--calibration-tokens", type=_model_field("calibration_tokens"), default=model.calibration_tokens,
                   help="for importance and search: tokens measured (search costs about n^2/2 forward passes over "
                        f"them; default {model.calibration_tokens})")
    p.add_argument("--search-objective", type=_model_field("search_objective"), default=model.search_objective,
                   choices=SEARCH_OBJECTIVES,
                   help="for search: keep KL to the teacher (kl) or calibration cross-entropy (ce) lowest "
                        f"(default: {model.search_objective})")
    p.add_argument("--random-init", action="store_true", default=model.random_init,
                   help="random weights with the cut architecture")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
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
    p.add_argument("--top-k", type=_int_at_least(1), required=True, help="logits kept per position (the vocabulary size keeps all)")
    p.add_argument("--temperatures", type=_parse_temperatures, default=[2.0],
                   help="comma-separated temperatures distill may use (loss.temperature), e.g. 1,2 (default 2)")
    p.add_argument("--block-size", type=_int_at_least(1), required=True, help="the distill run's data.block_size")
    p.add_argument("--out", required=True, help="cache folder (model.teacher_cache / distill --teacher-cache)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"],
                   help="split to cache (distill reads train)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="blocks per teacher forward (and per resumable chunk)")
    p.add_argument("--tail-samples", type=int, default=None,
                   help=f"ids drawn per position from the teacher's distribution outside its top-k, at each temperature, "
                        f"so that the tail's gradient is unbiased (default {DEFAULT_TAIL_SAMPLES}; 0 keeps only the tail "
                        f"bucket; see docs/teacher_cache.md)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="storage of the top-k logits")
    p.add_argument("--rank", type=_int_at_least(0), default=0, help="this process's part (0..world-size-1)")
    p.add_argument("--world-size", type=_int_at_least(1), default=1, help="processes sharing the work, each writing its own part")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(parser=p, func=cmd_cache_teacher)

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
    p.add_argument("--window", type=_int_at_least(2), default=None, help="for --data: tokens per forward pass (default 512)")
    p.add_argument("--stride", type=_int_at_least(1), default=None, help="for --data: new tokens scored per window (default: the window)")
    p.add_argument("--max-tokens", type=_int_at_least(2), default=None, help="for --data: score only the first N tokens of each source")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="windows or requests per forward pass")
    p.add_argument("--json", help="also write the full results (protocols, counts, metrics, times) as JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(parser=p, func=cmd_eval)

    p = sub.add_parser("generate", help="continue prompts (from --prompt or stdin)")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one prompt per stdin line")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--temperature", type=_number("a number >= 0 (0: greedy)", lambda v: v >= 0), default=0.0,
                   help="0 for greedy")
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--top-p", type=_number("a number in (0, 1]", lambda v: 0 < v <= 1), default=None)
    p.add_argument("--repetition-penalty", type=_number("a number > 0 (1: off)", lambda v: v > 0), default=1.0)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--compare", metavar="MODEL2", help="also continue each prompt with MODEL2 and compare speeds")
    p.set_defaults(parser=p, func=cmd_generate)

    p = sub.add_parser("bench", help="parameters, size, memory and speed of several models, measured interleaved")
    p.add_argument("models", nargs="+", help="MODELs sharing one tokenizer; speed-ups are relative to the first")
    p.add_argument("--prompt-tokens", type=_int_at_least(1), default=128, help="prompt length for generation and prefill")
    p.add_argument("--new-tokens", type=_int_at_least(1), default=128, help="tokens generated at batch 1 (greedy, KV cache)")
    p.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed repeats per measurement (median and spread)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed runs first")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="batched forward throughput: sequences")
    p.add_argument("--seq-len", type=_int_at_least(1), default=256, help="batched forward throughput: tokens per sequence")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", help="also write the full results as JSON")
    p.set_defaults(parser=p, func=cmd_bench)

    p = sub.add_parser("report", help="report.md with plots for a run directory (finished, running or interrupted)")
    p.add_argument("run_dir", help="the run directory (lmdistill distill --out)")
    p.add_argument("--eval", help="include an `lmdistill eval --json` file (default: RUN_DIR/eval.json if present)")
    p.add_argument("--bench", help="include an `lmdistill bench --json` file (default: RUN_DIR/bench.json if present)")
    p.set_defaults(parser=p, func=cmd_report)

    p = sub.add_parser("demo", help="distil the bundled SmolLM2-135M into 15 layers and compare")
    p.add_argument("--minutes", type=_number("a number of minutes > 0", lambda v: v > 0), default=10.0,
                   help="training time budget")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--eval-tokens", type=_int_at_least(2), default=32768, help="test tokens scored per corpus")
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


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 2 bad input, 130 interrupted).

    The tool's own errors (:class:`lmdistill.errors.LmdistillError`) and file-system errors on a
    named path are printed as one line ``lmdistill CMD: error: MESSAGE``; anything else is a bug
    and keeps its traceback. ``LMDISTILL_DEBUG=1`` shows the traceback for every error.
    """
    # Quiet transformers' offline-hub chatter and tokenizers' fork warning before they load (the
    # commands import them lazily). Set here, not on import, so importing this module changes
    # nothing for a program that uses the library.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as stop:  # --help (0), or a usage error argparse printed as one line (2)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    from transformers.utils import logging as hf_logging

    # Our own bars show progress; transformers' per-file load/save bars only add noise.
    hf_logging.disable_progress_bar()

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nlmdistill {args.command}: interrupted", file=sys.stderr)
        return 130
    except LmdistillError as err:
        if os.environ.get("LMDISTILL_DEBUG"):
            raise
        return _error(args.command, str(err))
    except OSError as err:
        message = _os_error_message(err)
        if message is None or os.environ.get("LMDISTILL_DEBUG"):
            raise
        return _error(args.command, message)


def _os_error_message(err: OSError) -> str | None:
    """One line for a file-system error the user can fix, or None for any other OSError (a bug).

    An OSError that names a path (permission denied, not a folder, a read-only or full disk, a
    file vanished) is about the user's files, not our code: the path and the system's reason
    are what they need, and the traceback would only show which of our lines touched it.
    """
    if err.filename is not None:
        path = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        return f"{path}: {err.strerror or err}; check the path, its permissions and the free disk space"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{err.strerror}; free some disk space and run the command again"
    return None


def _error(command: str, message: str) -> int:
    rank = os.environ.get("RANK", "0") if "MASTER_ADDR" in os.environ else "0"  # torchrun: say which process
    where = f" (rank {rank})" if rank != "0" else ""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"lmdistill {command}{where}: error: {one_line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
