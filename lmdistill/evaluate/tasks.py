"""Evaluation tasks named on the command line as ``TASK[:key=value...]``.

Each task reads and checks its data before any model loads (``load``), scores one model at a
time (``score``), and states its protocol (``protocol``) so every printed number carries it.

===========  ===============================================================================
task         what it computes
===========  ===============================================================================
ppl          token-level perplexity of a text source over windows (transformers' sliding-
             window protocol): ``ppl:corpus=all:split=test``, ``ppl:source=FILE``, options
             ``window``, ``stride``, ``max_tokens``
rolling      the harness ``wikitext`` protocol on any text source (one document per source
             document): ``rolling:corpus=all``, ``rolling:source=FILE``
wikitext     lm-evaluation-harness ``wikitext``: document-level rolling log-likelihood ->
             word_perplexity, byte_perplexity, bits_per_byte; ``path=`` a WikiText raw
             folder or file (wikitext-2-raw, wikitext-103-raw), or, online, no path
             (``variant=2|103`` from the hub, as the harness reads it)
ptb          the same rolling protocol on Penn Treebank (``ptb.test.txt``): word perplexity
enwik8/text8 rolling log-likelihood of the raw bytes: bits per byte (= per character)
lambada      lm-evaluation-harness ``lambada_openai``: last-word accuracy, target perplexity
hellaswag    lm-evaluation-harness ``hellaswag`` acc / acc_norm, and the nanoGPT / llm.c
             completion-style accuracy (lowest mean loss over the ending)
lastword     LAMBADA-style last-word set built from the bundled test split (shipped)
===========  ===============================================================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.corpora import CORPORA
from ..errors import LmdistillError
from ..data.prepare import tokenize_documents
from ..data.sources import parse_source
from ..models.fingerprint import tokenizer_fingerprint
from .perplexity import PerplexityProtocol, perplexity


class TaskError(LmdistillError):
    """A task argument that cannot be used; the message names the fix."""


@dataclass
class Task:
    """Base: options parsed from ``name:key=value:...``; subclasses fill load/score/protocol."""

    name: str
    options: dict[str, str]
    label: str = ""

    allowed: ClassVar[tuple[str, ...]] = ()   # option keys the task accepts
    metrics: ClassVar[tuple[str, ...]] = ()   # table columns, in order

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(self.allowed)
        if unknown:
            raise TaskError(f"task {self.name} has no option(s) {', '.join(sorted(unknown))}; options: {', '.join(self.allowed) or 'none'}")
        self.label = self.label or self.name

    def opt(self, key: str, default: Any = None, kind: type = str, minimum: int | None = None) -> Any:
        if key not in self.options:
            return default
        try:
            value = kind(self.options[key])
        except ValueError:
            raise TaskError(f"task {self.name}: option {key}={self.options[key]!r} is not a valid {kind.__name__}") from None
        if minimum is not None and value < minimum:
            raise TaskError(f"task {self.name}: option {key}={value} must be at least {minimum}")
        return value

    def path(self) -> Path:
        if "path" not in self.options:
            raise TaskError(f"task {self.name} needs path=... (the local data file or folder); see README 'Benchmarks'")
        path = Path(self.options["path"]).expanduser()
        if not path.exists():
            raise TaskError(f"task {self.name}: {path} does not exist; download the data and pass its path")
        return path

    def load(self) -> None:
        raise NotImplementedError

    def protocol(self) -> str:
        raise NotImplementedError

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> dict[str, Any]:
        raise NotImplementedError


class PerplexityTask(Task):
    allowed = ("corpus", "source", "split", "window", "stride", "max_tokens")
    metrics = ("perplexity",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if ("corpus" in self.options) == ("source" in self.options):
            raise TaskError("task ppl needs exactly one of corpus=NAME (austen, moby_dick, sotu) or source=SRC")
        self.source = f"corpus:{self.options['corpus']}" if "corpus" in self.options else self.options["source"]
        self.split = self.opt("split", "test")
        self.label = f"ppl {self.source.removeprefix('corpus:')}"
        self._streams: dict[str, Any] = {}

    def load(self) -> None:
        try:
            self.protocol_ = PerplexityProtocol(window=self.opt("window", 512, int), stride=self.opt("stride", None, int),
                                                max_tokens=self.opt("max_tokens", None, int))
        except TaskError:
            raise
        except ValueError as err:  # the protocol's own range checks, in its field names
            raise TaskError(f"task {self.label}: {err}; fix its window=, stride= or max_tokens= option (--window, "
                            f"--stride, --max-tokens)") from None
        self.texts = list(parse_source(self.source).documents(self.split))

    def protocol(self) -> str:
        return f"{self.protocol_.describe()}; {self.split} split of {self.source}, documents joined with EOS"

    def score(self, model, tokenizer, batch_size):
        key = tokenizer_fingerprint(tokenizer)
        if key not in self._streams:
            self._streams[key] = tokenize_documents(tokenizer, self.texts)
        protocol = PerplexityProtocol(self.protocol_.window, self.protocol_.stride, self.protocol_.max_tokens, batch_size)
        result = perplexity(model, self._streams[key], protocol, progress=True, desc=self.label)
        return {"perplexity": result.perplexity, "tokens_scored": result.tokens_scored, "nll_sum": result.nll_sum}


class RollingTask(Task):
    """Document-level rolling log-likelihood (lm-evaluation-harness ``wikitext`` protocol)."""

    allowed = ("path", "split", "max_docs")
    metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")

    def documents(self) -> list[str]:
        raise NotImplementedError

    def detokenize(self):
        return None

    def load(self) -> None:
        self.docs = self.documents()[: self.opt("max_docs", None, int, minimum=1)]
        if not self.docs:
            raise TaskError(f"task {self.name}: no documents found in {self.options.get('path')}")

    def protocol(self) -> str:
        detok = "after the harness's detokenizer, " if self.detokenize() else ""
        return (f"lm-evaluation-harness rolling log-likelihood per document ({len(self.docs)} documents, {detok}"
                f"windows of the model's max length, each token scored once); word perplexity = exp(-LL / words), "
                f"words = whitespace-separated tokens of the original text; bits per byte = -LL / bytes / ln 2")

    def score(self, model, tokenizer, batch_size):
        from .rolling import score_documents

        result = score_documents(model, tokenizer, self.docs, detokenize=self.detokenize(), batch_size=batch_size, progress=True)
        return result.to_dict()


class SourceRollingTask(RollingTask):
    """The harness ``wikitext`` protocol on any text source: ``rolling:corpus=all``, ``rolling:source=FILE``."""

    allowed = ("corpus", "source", "split", "max_docs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if ("corpus" in self.options) == ("source" in self.options):
            raise TaskError("task rolling needs exactly one of corpus=NAME (austen, moby_dick, sotu) or source=SRC")
        self.source = f"corpus:{self.options['corpus']}" if "corpus" in self.options else self.options["source"]
        self.label = f"rolling {self.source.removeprefix('corpus:')}"

    def documents(self):
        return list(parse_source(self.source).documents(self.opt("split", "test")))


class WikiTextTask(RollingTask):
    allowed = ("path", "split", "max_docs", "variant")

    def documents(self):
        from .datasets import wikitext_documents

        if "path" in self.options:
            return wikitext_documents(self.path(), self.opt("split", "test"))
        return self._from_hub()

    def _from_hub(self) -> list[str]:
        # Without a path, the harness's own source: EleutherAI/wikitext_document_level.
        from ..models.hub import hub_reachable

        variant = self.opt("variant", "2")
        if variant not in ("2", "103"):
            raise TaskError(f"task wikitext: variant={variant} must be 2 or 103")
        if not hub_reachable():
            raise TaskError("task wikitext needs path=DIR (a wikitext-2-raw or wikitext-103-raw folder) on a machine "
                            "that cannot reach the Hugging Face hub")
        import datasets

        split = {"validation": "validation", "valid": "validation"}.get(self.opt("split", "test"), self.opt("split", "test"))
        rows = datasets.load_dataset("EleutherAI/wikitext_document_level", f"wikitext-{variant}-raw-v1", split=split)
        return list(rows["page"])

    def detokenize(self):
        from .datasets import wikitext_detokenizer

        return wikitext_detokenizer


class PTBTask(RollingTask):
    allowed = ("path", "split", "max_docs", "detokenize")
    metrics = ("word_perplexity", "bits_per_byte")

    def documents(self):
        from .datasets import ptb_documents

        return ptb_documents(self.path(), self.opt("split", "test"))

    def detokenize(self):
        from .datasets import ptb_detokenizer

        return ptb_detokenizer if self.opt("detokenize", 0, int) else None


class ByteTask(RollingTask):
    """enwik8 / text8: bits per byte (per character for text8, which is plain ASCII)."""

    allowed = ("path", "split", "max_bytes")
    metrics = ("bits_per_byte",)

    def documents(self):
        from .datasets import byte_corpus

        raw = byte_corpus(self.path(), self.opt("split", "test"), name=self.name)[: self.opt("max_bytes", None, int, minimum=1)]
        self.raw_bytes = len(raw)
        # Scored as one document. A split may cut a multi-byte character (or hold invalid
        # UTF-8): those bytes are replaced for tokenising, and the denominator stays the raw
        # byte count (see score), not the length of the re-encoded text.
        return [raw.decode("utf-8", errors="replace")]

    def protocol(self) -> str:
        return (f"rolling log-likelihood of the {self.opt('split', 'test')} split ({self.raw_bytes:,} bytes) as one "
                f"document, windows of the model's max length; bits per byte = -LL / raw bytes / ln 2")

    def score(self, model, tokenizer, batch_size):
        result = super().score(model, tokenizer, batch_size)
        result["bytes"] = self.raw_bytes
        result["bits_per_byte"] = -result["loglikelihood"] / self.raw_bytes / math.log(2)
        return result


class ItemTask(Task):
    """Scored item by item (passages, multiple-choice questions): items read by ``items``,
    cut to ``max_docs=``, scored by the module ``scorer`` returns."""

    def items(self) -> list[dict]:
        raise NotImplementedError

    def scorer(self):
        raise NotImplementedError

    def load(self) -> None:
        self.docs = self.items()[: self.opt("max_docs", None, int, minimum=1)]

    def score(self, model, tokenizer, batch_size):
        return self.scorer().score(model, tokenizer, self.docs, batch_size=batch_size, progress=True)


class LambadaTask(ItemTask):
    allowed = ("path", "max_docs")
    metrics = ("acc", "perplexity")

    def items(self) -> list[dict]:
        from .datasets import read_lambada

        return read_lambada(self.path())

    def scorer(self):
        from . import lambada

        return lambada

    def protocol(self) -> str:
        return (f"lm-evaluation-harness lambada_openai ({len(self.docs)} passages): context = text up to the last "
                f"space, target = ' ' + last word; acc = every target token is the greedy choice; "
                f"perplexity = exp(-mean target log-likelihood)")


class LastWordTask(LambadaTask):
    allowed = ("max_docs",)

    def items(self) -> list[dict]:
        from .lastword import load_lastword

        return load_lastword()

    def protocol(self) -> str:
        return (f"last-word set built from the bundled test split ({len(self.docs)} passages; construction in "
                f"lmdistill/evaluate/data/README.md), scored as lm-evaluation-harness lambada_openai: "
                f"context = text up to the last space, target = ' ' + last word; acc = every target token is the "
                f"greedy choice; perplexity = exp(-mean target log-likelihood)")


class HellaSwagTask(ItemTask):
    allowed = ("path", "max_docs")
    metrics = ("acc", "acc_norm", "completion_acc")

    def items(self) -> list[dict]:
        from .datasets import read_hellaswag

        return read_hellaswag(self.path())

    def scorer(self):
        from . import hellaswag

        return hellaswag

    def protocol(self) -> str:
        return (f"{len(self.docs)} items; acc / acc_norm as lm-evaluation-harness hellaswag (its preprocessing; "
                f"acc_norm divides each ending's log-likelihood by its length in characters); completion_acc as "
                f"nanoGPT/llm.c (context `ctx`, lowest mean token loss over ' ' + ending)")


TASKS: dict[str, type[Task]] = {
    "ppl": PerplexityTask, "rolling": SourceRollingTask, "wikitext": WikiTextTask, "ptb": PTBTask, "enwik8": ByteTask, "text8": ByteTask,
    "lambada": LambadaTask, "hellaswag": HellaSwagTask, "lastword": LastWordTask,
}


def parse_tasks(spec: str) -> list[Task]:
    """``name:key=value:...`` to tasks; ``ppl:corpus=all`` stands for one task per bundled corpus.

    Options are separated by ``:`` only where ``key=`` follows, so a value may hold colons
    (``ppl:source=hf:wikitext:wikitext-2-raw-v1:split=test``).
    """
    name, _, rest = spec.partition(":")
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    options: dict[str, str] = {}
    for part in re.split(r":(?=[A-Za-z_]+=)", rest) if rest else []:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise TaskError(f"task option {part!r} in {spec!r} must look like key=value")
        options[key] = value
    if name in ("ppl", "rolling") and options.get("corpus") == "all":
        return [TASKS[name](name, {**options, "corpus": corpus}) for corpus in CORPORA]
    return [TASKS[name](name, options)]
