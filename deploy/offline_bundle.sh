#!/usr/bin/env bash
# Pack what an ingest needs beyond a GPU image's PyTorch stack, for a GPU host with no package index.
#
#   bash deploy/offline_bundle.sh BUNDLE [PYVER]     # on a machine with pip and the index; PYVER default 3.12
#   (copy the repository and BUNDLE to the GPU host)
#   source BUNDLE/activate.sh                        # on the GPU host, from the repository root
#   fbas-pipeline ingest corpus.parquet --target gpu --precision fp16 ...   (python3 -m pipeline.cli ...)
#
# BUNDLE/wheels/     Celery, kombu, redis-py, tritonclient, FAISS and their small dependencies (no torch:
#                    the GPU image has it; numpy, pyarrow, tokenizers, grpcio, msgpack are expected there too)
#   BUNDLE/triton.tar.xz  tritonserver 2.51 from the nvidia-pytriton wheel, with the Python-backend stub
#                    for PYVER only (as deploy/install_triton.sh unpacks it, without the numpy<2 pin)
#   BUNDLE/redis/    this machine's redis-server and the libraries a bare image may lack, behind a wrapper
#   BUNDLE/activate.sh    installs the wheels into BUNDLE/site, unpacks Triton, puts both on the paths
# Used for BENCHMARKS.md "Whole ingest on one GPU host" (PYVER 3.12, x86-64, 54 MB).
set -euo pipefail

BUNDLE="${1:?usage: deploy/offline_bundle.sh BUNDLE [PYVER]}"
PYVER="${2:-3.12}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/redis/lib"
BUNDLE="$(cd "$BUNDLE" && pwd)"

# 1. wheels (exact versions that this repository's tests ran with)
WHEELS=(celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1
        click-plugins==1.1.1.2 click-repl==0.4.1 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
        tzdata redis==8.1.0 tritonclient==2.73.0 python-rapidjson==1.25 faiss-cpu==1.15.1 prometheus-client==0.26.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" "${WHEELS[@]}"

# 2. tritonserver + the Python backend stub for PYVER
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_35_x86_64 -d "$WORK" \
    nvidia-pytriton==0.7.0
python3 - "$WORK"/nvidia_pytriton-*.whl "$WORK/t" "$PYVER" <<'PYEOF'
import sys, zipfile
wheel, dest, pyver = sys.argv[1:4]
keep = ("pytriton/tritonserver/bin/", "pytriton/tritonserver/backends/", "pytriton/tritonserver/caches/",
        f"pytriton/tritonserver/python_backend_stubs/{pyver}/", "nvidia_pytriton.libs/")
with zipfile.ZipFile(wheel) as z:
    names = [m for m in z.namelist() if m.startswith(keep) and "libpython3" not in m]
    z.extractall(dest, names)
PYEOF
SERVER="$WORK/t/pytriton/tritonserver"
cp "$SERVER/python_backend_stubs/$PYVER/triton_python_backend_stub" "$SERVER/backends/python/"
rm -rf "$SERVER/python_backend_stubs"
chmod +x "$SERVER/bin/tritonserver" "$SERVER/backends/python/triton_python_backend_stub"
tar -C "$WORK/t" -cJf "$BUNDLE/triton.tar.xz" pytriton nvidia_pytriton.libs

# 3. redis-server with the libraries it links that are not in every image
REDIS="$(command -v redis-server)" || { echo "offline_bundle.sh: redis-server not on PATH" >&2; exit 2; }
cp "$REDIS" "$BUNDLE/redis/lib/redis-server"
for lib in liblzf.so.1 libjemalloc.so.2 libatomic.so.1; do
    path="$(ldd "$REDIS" | awk -v l="$lib" '$1 == l {print $3}')"
    [[ -n "$path" ]] && cp -L "$path" "$BUNDLE/redis/lib/"
done
cat > "$BUNDLE/redis/redis-server" <<'EOF'
#!/bin/sh
here="$(dirname "$(readlink -f "$0")")"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/lib/redis-server" "$@"
EOF
chmod +x "$BUNDLE/redis/redis-server"

# 4. the activation script
cat > "$BUNDLE/activate.sh" <<'EOF'
# source from the repository root on the GPU host: wheels into BUNDLE/site, Triton into BUNDLE/triton
_fbas_bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -d "$_fbas_bundle/site/celery" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$_fbas_bundle/site" \
        "$_fbas_bundle"/wheels/*.whl || return 1
fi
if [ ! -x "$_fbas_bundle/triton/pytriton/tritonserver/bin/tritonserver" ]; then
    mkdir -p "$_fbas_bundle/triton" && tar -xJf "$_fbas_bundle/triton.tar.xz" -C "$_fbas_bundle/triton" || return 1
fi
export PYTHONPATH="$PWD:$_fbas_bundle/site${PYTHONPATH:+:$PYTHONPATH}"
export FBAS_TRITONSERVER="$_fbas_bundle/triton/pytriton/tritonserver/bin/tritonserver"
export PATH="$_fbas_bundle/redis:$PATH"
python3 -c "import celery.app, redis, faiss, tritonclient.grpc, workers.app" || return 1
echo "fbas offline bundle active: tritonserver, redis-server and the pipeline's packages on the paths"
EOF
echo "bundle in $BUNDLE: $(du -sh "$BUNDLE" | cut -f1)"
