"""The distillation loss: what a run minimises, given the student's and the teacher's outputs.

- ``terms.py``: the per-term losses (KL, CE, cosine, MSE, layer alignment), the reductions
  they share, and ``distillation_loss``, their weighted sum under a ``config.LossConfig``.
- ``divergences.py``: the logit divergences behind one API (``DivergenceSpec``), and the names
  the logged terms carry (``logit_term_name``, ``LOGIT_TERMS``, ``TERM_NAMES``).
- ``sparse.py``: forward KL against stored sparse teacher targets (a teacher cache's).
- ``fused.py`` and ``chunks.py``: KL + CE fused with the lm_head, chunk by chunk, against a live
  or a stored teacher.
- ``objective.py``: the student and its loss as one module, and ``logit_path``, the choice
  between the fused loss and full logits.
"""
