#!/usr/bin/env bash
# Entrypoint of the fbas worker-host image (deploy/Dockerfile).
#
#   worker-host.sh both      tritonserver (`fbas-pipeline serve`, in the background) and, once Triton is ready,
#                            the supervised Celery worker (`fbas-pipeline worker`); when either exits, the other
#                            is stopped and the container exits with the first one's status (default mode)
#   worker-host.sh serve     `fbas-pipeline serve` alone, in the foreground (the Kubernetes pod's Triton container)
#   worker-host.sh worker    wait until Triton answers ready, then `fbas-pipeline worker` in the foreground
#                            (the Kubernetes pod's worker container)
#   worker-host.sh drain     wait until the worker's metrics port stops answering (the worker has finished its
#                            batches and exited), at most DRAIN_TIMEOUT seconds: the Triton container's preStop
#   worker-host.sh CMD ...   anything else runs as it is, e.g. `fbas-pipeline ingest ...` for the producer
#
# Settings (none is a secret): MODEL_DIR, MODEL_REPOSITORY, OUT_ROOT, TRITON_HOST (default 127.0.0.1),
# TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT, FBAS_WORKER_METRICS_PORT and FBAS_WORKER_METRICS_HOST (the worker's
# metrics endpoint, default 0.0.0.0:9108), READY_TIMEOUT (default 600), DRAIN_TIMEOUT (default 170). The broker URL and the task key come only from
# the environment (FBAS_BROKER, FBAS_TASK_KEY) and are never put on a command line.
#
# Ports are passed as flags to each command: `serve --metrics-port` is Triton's, `worker --metrics-port` the
# worker's own Prometheus endpoint (FBAS_WORKER_METRICS_PORT).
set -euo pipefail

MODE="${1:-both}"
MODEL_DIR="${MODEL_DIR:-/opt/fbas/model}"
MODEL_REPOSITORY="${MODEL_REPOSITORY:-/opt/fbas/repository}"
OUT_ROOT="${OUT_ROOT:-/data}"
TRITON_HOST="${TRITON_HOST:-127.0.0.1}"
TRITON_GRPC_PORT="${TRITON_GRPC_PORT:-8001}"
TRITON_HTTP_PORT="${TRITON_HTTP_PORT:-8000}"
TRITON_METRICS_PORT="${TRITON_METRICS_PORT:-8002}"
WORKER_METRICS_PORT="${FBAS_WORKER_METRICS_PORT:-9108}"
# every interface: in a container, Prometheus (or a published port) reaches the container's address, not its loopback
WORKER_METRICS_HOST="${FBAS_WORKER_METRICS_HOST:-0.0.0.0}"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-170}"

log() { echo "worker-host: $*" >&2; }

serve_cmd=(fbas-pipeline serve --model-dir "$MODEL_DIR" --model-repository "$MODEL_REPOSITORY"
           --host "$TRITON_HOST" --grpc-port "$TRITON_GRPC_PORT" --http-port "$TRITON_HTTP_PORT"
           --metrics-port "$TRITON_METRICS_PORT")
# --target gpu: the image's engine; it sizes the worker pool (FBAS_CONCURRENCY overrides)
worker_cmd=(fbas-pipeline worker --triton "127.0.0.1:$TRITON_GRPC_PORT" --out-root "$OUT_ROOT" --target gpu
            --metrics-port "$WORKER_METRICS_PORT" --metrics-host "$WORKER_METRICS_HOST")

# 0 once Triton's HTTP endpoint says ready (the model is loaded); 1 otherwise
triton_ready() {
    python - "$TRITON_HTTP_PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

# wait until Triton is ready; gives up after READY_TIMEOUT s, or at once when process $1 (if given) has exited
wait_ready() {
    local pid="${1:-}" waited=0
    until triton_ready; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "fbas-pipeline serve exited before Triton was ready"
            return 1
        fi
        if (( waited >= READY_TIMEOUT )); then
            log "Triton was not ready after ${READY_TIMEOUT}s"
            return 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    log "Triton is ready on 127.0.0.1:$TRITON_GRPC_PORT"
}

case "$MODE" in
    serve)
        exec "${serve_cmd[@]}"
        ;;
    worker)
        wait_ready
        exec "${worker_cmd[@]}"
        ;;
    drain)
        waited=0
        while (( waited < DRAIN_TIMEOUT )) && python - "$WORKER_METRICS_PORT" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
        do
            sleep 2
            waited=$((waited + 2))
        done
        exit 0
        ;;
    both)
        serve_pid="" worker_pid=""
        stop_all() {
            [[ -n "$worker_pid" ]] && kill -TERM "$worker_pid" 2>/dev/null || true
            # the worker finishes its batches (Celery warm shutdown) before Triton goes away
            [[ -n "$worker_pid" ]] && wait "$worker_pid" 2>/dev/null || true
            [[ -n "$serve_pid" ]] && kill -TERM "$serve_pid" 2>/dev/null || true
            [[ -n "$serve_pid" ]] && wait "$serve_pid" 2>/dev/null || true
        }
        trap 'log "stopping"; stop_all; exit 143' TERM INT
        "${serve_cmd[@]}" &
        serve_pid=$!
        if ! wait_ready "$serve_pid"; then
            stop_all
            exit 1
        fi
        "${worker_cmd[@]}" &
        worker_pid=$!
        status=0
        wait -n "$serve_pid" "$worker_pid" || status=$?
        if ! kill -0 "$serve_pid" 2>/dev/null; then
            log "fbas-pipeline serve exited (status $status): stopping the worker"
        else
            log "fbas-pipeline worker exited (status $status): stopping tritonserver"
        fi
        trap - TERM INT
        stop_all
        exit "$(( status == 0 ? 1 : status ))"
        ;;
    *)
        exec "$@"
        ;;
esac
