"""Evaluation of teacher and student: perplexity (more benchmarks to come)."""

from lmdistill.evaluate.perplexity import PerplexityProtocol, PerplexityResult, perplexity

__all__ = ["PerplexityProtocol", "PerplexityResult", "perplexity"]
