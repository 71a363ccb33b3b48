#!/usr/bin/env bash
# One GPU call: the engine's GPU tests on random MiniLM-shape weights, the host's cores for the ivfpq index
# (bench_index_add.py), then bench_scale.py through a running service (scale_10m.sh).
#
#   here:      the two folders of scale_10m.sh; carry .devcarry/bundle, .devcarry/minilm and
#              dll/build/libfbas_wordpiece.so (61 MB with the tree; the tokenizer's tables are built once per
#              host, by the worker, since they depend on that host's tokenizers version)
#   GPU host:  ROWS=1000000 INDEX=ivfpq,flat [GPU_TESTS=PYTEST_K|none] [INDEX_ADD=0] bash benchmarks/gpu_host/engine_and_scale.sh [SCALE_SECONDS [flags]]
#
# The bundle is copied to KEEP (default /root/fbas-bundle) first, so that a later call on the same warm machine
# can carry something else (the real weights) and still use it: BUNDLE=/root/fbas-bundle bash scale_10m.sh.
set -u
OUT="${OUT:-$PWD/gpu-results}"; mkdir -p "$OUT"; export OUT
KEEP="${KEEP:-/root/fbas-bundle}"
[ -d "$KEEP" ] || cp -a "${BUNDLE:-.devcarry/bundle}" "$KEEP"
source "$KEEP/activate.sh" > "$OUT/activate.log" 2>&1 || { tail -20 "$OUT/activate.log"; exit 1; }
[ -f dll/build/libfbas_wordpiece.so ] || bash dll/build_wordpiece.sh > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
export PYTHONUNBUFFERED=1
if [ "${GPU_TESTS:-graphs_match_eager}" != none ]; then  # GPU_TESTS=none: straight to the measures below
  TEST_MODEL=/root/probe/model  # random weights of MiniLM's shape (no checkpoint travels in this call)
  [ -d "$TEST_MODEL" ] || python3 -c "import sys; sys.path[:0] = ['.', 'benchmarks']; from pathlib import Path
from bench_gpu_ingest import random_model; random_model(Path('${MINILM:-.devcarry/minilm}'), Path('$TEST_MODEL'), 'minilm')"
  FBAS_GPU_TEST_MODEL="$TEST_MODEL" timeout 150 python3 -m pytest -q -x tests/gpu/test_gpu_engine.py \
    -k "${GPU_TESTS:-graphs_match_eager}" > "$OUT/gputests.log" 2>&1
  echo "gpu tests rc=$?"; tail -4 "$OUT/gputests.log"
fi
# the host's cores for the ivfpq index, idle, at 4l's thread counts (INDEX_ADD=0: skip; about a minute)
if [ "${INDEX_ADD:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/bench_index_add.py --threads 4,8,16 --json "$OUT/index_add.json" > "$OUT/index_add.log" 2>&1
  echo "index add rc=$?"; tail -5 "$OUT/index_add.log" | cut -c1-400
fi
BUNDLE="$KEEP" bash benchmarks/gpu_host/scale_10m.sh "${1:-240}" "${@:2}"
