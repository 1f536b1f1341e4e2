"""lmdistill: distil a causal language model into a smaller, faster student."""

__version__ = "0.1.0"
