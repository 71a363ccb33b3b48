#!/usr/bin/env bash
# Feeding a small model: all-MiniLM-L6-v2's shape on 2,154,000 STS-B sentences through a running service, one
# service per variant (fp32 or fp16 outputs, system shared memory between workers and Triton, four instances),
# each against the engine alone in the same run. Set up as for scale_10m.sh; VARIANTS overrides the list.
#
#   GPU host:  bash benchmarks/gpu_host/feed_variants.sh [SECONDS]
set -u
OUT="${OUT:-$PWD/gpu-results}"; mkdir -p "$OUT"
BUNDLE="${BUNDLE:-.devcarry/bundle}"; MINILM="${MINILM:-.devcarry/minilm}"
source "$BUNDLE/activate.sh" > "$OUT/activate.log" 2>&1 || { tail -20 "$OUT/activate.log"; exit 1; }
[ -f dll/build/libfbas_wordpiece.so ] || bash dll/build_wordpiece.sh > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
export PYTHONUNBUFFERED=1
timeout "${1:-570}" python3 benchmarks/bench_gpu_ingest.py --tokenizer "$MINILM" --data tests/data \
  --cases minilm-stsb --stsb-repeat 400 --instance-counts 2 --service --runs 1 --local-runs 0 --log-lines 400 \
  --service-variants "${VARIANTS:-fp32=,fp16=output_dtype:fp16,shm=shared_memory:true,fp16i4=output_dtype:fp16+instance_count:4}" \
  --json "$OUT/feed.json" --work "$PWD/feedwork" > "$OUT/feed.log" 2>&1
echo "rc=$?"; grep -v "WARNING\|Writing model" "$OUT/feed.log" | cut -c1-600 | tail -30
