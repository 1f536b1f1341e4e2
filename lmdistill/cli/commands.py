"""The subcommands: each checks its arguments, calls the library and prints what it did."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ModelConfig
from .args import DEFAULT_TAIL_SAMPLES, INIT_STUDENT_FIELDS, UsageError, check_writable, output_file, write_json

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare
    from ..data.sources import parse_source
    from ..models.load import load_tokenizer

    for spec in args.source:
        parse_source(spec)  # fail on a bad source before loading the tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    data = prepare(tokenizer, args.source, Path(args.out), tokenizer_name=args.tokenizer)
    for split, count in data.splits.items():
        print(f"{split:>10}: {count:,} tokens")
    print(f"{'reused' if data.reused else 'wrote'} {data.out_dir}")
    return 0


def cmd_init_student(args: argparse.Namespace) -> int:
    from ..models.arch import config_num_layers, count_parameters, decoder_layers
    from ..models.load import load_model, load_tokenizer, model_config
    from ..models.save import save_model
    from ..card import card_name, current_command, student_facts, write_card
    from ..student.cut import CALIBRATION_BLOCK_SIZE, cut_student
    from ..student.maps import check_layer_request, resolve_strategy

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose another --out for the student folder")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} already exists and is not empty; choose another --out or delete it first")
    check_writable(out, "--out")
    model = ModelConfig(**{name: getattr(args, name) for name in INIT_STUDENT_FIELDS})
    teacher_config = model_config(model.teacher)
    check_layer_request(config_num_layers(teacher_config), model.layers, model.num_layers,
                        resolve_strategy(model.strategy, teacher_config))  # before loading weights
    tokenizer = load_tokenizer(model.teacher)
    teacher = load_model(model.teacher)
    cut = cut_student(teacher, model, lambda: _calibration(tokenizer, args.calibration, model),
                      block_size=CALIBRATION_BLOCK_SIZE, seed=args.seed, log=print)
    card = student_facts(model.teacher, cut.student, current_command(f"lmdistill init-student --teacher {model.teacher} ..."))
    save_model(cut.student, tokenizer, out, extra=lambda tmp: write_card(tmp, card, card_name(out)))
    t_params, s_params = count_parameters(teacher), count_parameters(cut.student)
    init = "random weights" if model.random_init else f"teacher layers {cut.layers}"
    print(f"teacher: {len(decoder_layers(teacher))} layers, {t_params / 1e6:.1f}M parameters")
    print(f"student: {len(cut.layers)} layers, {s_params / 1e6:.1f}M parameters ({s_params / t_params:.0%}), {init}")
    if cut.choice is not None:
        print(f"how the layers were chosen (every step and score): lmdistill_layer_choice in {out / 'config.json'}")
    print(f"wrote {out}")
    return 0


def _calibration(tokenizer: PreTrainedTokenizerBase, source: str, model: ModelConfig) -> np.ndarray:
    """``source``'s train split as distill prepares it (the same cached folder, so that the same
    text gives init-student and distill the same student); the cut measures blocks spread over it."""
    from ..train.plan import prepare_sources

    tokens = prepare_sources(tokenizer, [source], model.teacher).tokens("train")
    print(f"calibration: {min(len(tokens), model.calibration_tokens):,} tokens spread over the "
          f"{len(tokens):,} train tokens of {source}")
    return tokens


def _flag(name: str, value: object) -> str:
    """A cache-teacher argument as its flag (for the builder's messages)."""
    return f"--{'dtype' if name == 'value_dtype' else name.replace('_', '-')} {value}"


def cmd_generate_corpus(args: argparse.Namespace) -> int:
    import torch

    from ..data.sources import parse_source
    from ..generate import check_length, encode_prompt
    from ..models.device import cpu_computes_bf16, resolve_device
    from ..models.fingerprint import model_fingerprint
    from ..models.load import load_model, load_tokenizer
    from ..teacher_text import TextSettings, write_corpus
    from ..train.plan import prepare_sources

    if args.prompts:
        parse_source(args.prompts)  # fail on a bad source before loading the teacher
    tokenizer = load_tokenizer(args.teacher)
    device = resolve_device(args.device)
    precision = args.precision
    if precision == "auto":  # bf16 where the hardware computes it natively, else float32
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_computes_bf16()
        precision = "bf16" if native else "fp32"
    teacher = load_model(args.teacher, device=device)
    start = encode_prompt(tokenizer, "")
    prompt_data = None
    if args.prompts:
        # All splits, as distill prepares them, so that both share one cached folder.
        prompt_data = prepare_sources(tokenizer, [args.prompts], args.teacher).tokens("train")
    settings = TextSettings(
        teacher=args.teacher, teacher_fingerprint=model_fingerprint(teacher), prompts=args.prompts,
        prompt_tokens=args.prompt_tokens if args.prompts else len(start), new_tokens=args.new_tokens,
        batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        precision=precision)
    check_length(teacher, settings.prompt_tokens, settings.new_tokens)
    if precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    end_ids = set(tokenizer.all_special_ids)  # end of document, and chat markers that are no prose

    def progress(done: int, target: int) -> None:
        print(f"generate-corpus: {done:,} / {target:,} tokens", flush=True)

    total = write_corpus(teacher, tokenizer, Path(args.out), settings, args.tokens, prompt_data, end_ids, start,
                         progress=progress)
    print(f"wrote {args.out}: {total:,} tokens of {args.teacher}'s text ({precision}); train on it with "
          f"data.sources=[..., {args.out}]")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from ..data.errors import DataError
    from ..data.prepare import load_prepared
    from ..data.sources import parse_source
    from ..models.arch import config_context_length
    from ..models.device import resolve_device
    from ..models.fingerprint import tokenizer_fingerprint
    from ..models.load import load_model, load_tokenizer, model_config
    from ..teacher_cache.build import build_teacher_cache, check_build_settings
    from ..teacher_cache.format import part_name
    from ..teacher_cache.reader import TeacherCache
    from ..train.plan import prepare_sources

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
        data = prepare_sources(tokenizer, args.data, args.teacher)
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
    from ..recipe import load_config
    from ..train.run import run_training

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
    from ..evaluate.results import format_eval
    from ..evaluate.runner import evaluate_models
    from ..evaluate.tasks import parse_tasks

    specs = list(args.task or [])
    for source in args.data or ([] if specs else ["corpus:all"]):
        # --data is shorthand for perplexity tasks sharing --split/--window/--stride/--max-tokens.
        where = f"corpus={source.removeprefix('corpus:')}" if source.startswith("corpus:") else f"source={source}"
        extra = "".join(f":{k}={v}" for k, v in (("window", args.window), ("stride", args.stride),
                                                   ("max_tokens", args.max_tokens)) if v is not None)
        specs.append(f"ppl:{where}:split={args.split}{extra}")
    tasks = [task for spec in specs for task in parse_tasks(spec)]
    target = output_file(args.json, "--json")
    cards = _card_folders(args.models) if args.card else []
    results = evaluate_models(args.models, tasks, batch_size=args.batch_size, device=args.device)
    print("\n".join(format_eval(results)))
    write_json(target, results)
    for spec, folder in cards:
        _update_card(folder, spec, args.models, results)
    return 0


def _card_folders(models: list[str]) -> list[tuple[str, Path]]:
    """The MODELs that are student folders with an lmdistill card (checked before any scoring)."""
    from ..card import FACTS_FILE

    found = [(spec, Path(spec)) for spec in models if (Path(spec) / FACTS_FILE).is_file()]
    if not found:
        raise UsageError(f"--card updates the model cards of student folders lmdistill wrote (they hold {FACTS_FILE}); "
                         f"none of {', '.join(models)} is one. Pass the student's folder, or leave out --card")
    return found


def _update_card(folder: Path, spec: str, models: list[str], results: dict) -> None:
    """Write ``results`` into the card of the student in ``folder`` (evaluated as ``spec``)."""
    from ..card import add_results, perplexity_ratios, read_facts

    teacher = read_facts(folder).teacher
    teacher_row = next((m for m in models if m == teacher or Path(m).resolve() == Path(teacher).resolve()), None)
    facts = add_results(folder, evaluation={"result": results, "student": spec, "teacher": teacher_row})
    ratios = perplexity_ratios(facts)
    beside = (" beside its teacher (" + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + ")") if ratios else ""
    print(f"card: wrote the results{beside} into {folder / 'README.md'}"
          + ("" if teacher_row else f"; evaluate the teacher ({teacher}) in the same command to show its scores too"))


def cmd_export(args: argparse.Namespace) -> int:
    from ..models.gguf_export import export_gguf
    from ..models.load import load_model, load_tokenizer
    from ..card import card_name

    target = output_file(args.gguf, "--gguf")
    if target.suffix != ".gguf":
        raise UsageError(f"--gguf {target}: name the file with a .gguf suffix, e.g. {target.with_suffix('.gguf')}")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    name = card_name(Path(args.model)) if Path(args.model).is_dir() else args.model
    result = export_gguf(model, tokenizer, target, args.type, name=name)
    kinds = ", ".join(f"{count} {kind}" for kind, count in result.types.items())
    print(f"wrote {result.path}: {result.bytes / 1e6:,.1f} MB, {result.tensors} tensors ({kinds}), "
          f"tokenizer pre-split {result.tokenizer_pre!r}")
    if result.tokenizer_pre == "default":
        print("note: llama.cpp may split text before BPE differently from this tokenizer (its pre-tokenizer is not "
              "one lmdistill names); check a few prompts' tokens in llama.cpp", file=sys.stderr)
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

    from ..generate import SamplingConfig, check_prompt_fits, encode_prompt, generate
    from ..measure.speed import REPEATS, WARMUP, generation_protocol, generation_speeds
    from ..models.device import model_device, resolve_device
    from ..models.fingerprint import tokenizer_fingerprint
    from ..models.load import load_model, load_tokenizer

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
    from ..measure.bench import BenchConfig, bench_models, format_bench

    config = BenchConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                         warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    target = output_file(args.json, "--json")
    results = bench_models(args.models, config)
    print("\n".join(format_bench(results)))
    write_json(target, results)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report.write import write_report

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
    from ..demo import run_demo

    results = run_demo(Path(args.out), minutes=args.minutes, eval_tokens=args.eval_tokens, resume=args.resume)
    return 0 if results else 130
