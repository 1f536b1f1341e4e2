"""The loss terms, the divergences and the fused chunked lm_head loss."""
