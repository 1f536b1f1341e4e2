"""Evaluation of teacher and student: perplexity and the tasks in :mod:`lmdistill.evaluate.tasks`
(LAMBADA, HellaSwag, last word, WikiText, PTB, enwik8/text8), run side by side by the runner."""

from lmdistill.evaluate.perplexity import PerplexityProtocol, PerplexityResult, perplexity

__all__ = ["PerplexityProtocol", "PerplexityResult", "perplexity"]
