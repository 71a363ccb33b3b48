#!/usr/bin/env bash
# Install the Triton Inference Server binary (2.51.0, from the nvidia-pytriton 0.7.0 wheel) next to a venv,
# WITHOUT installing the nvidia-pytriton Python package (it pins numpy<2, which the runtime must not get).
#
#   bash deploy/install_triton.sh [VENV]        # default VENV=.venv
#
# Result (idempotent; reruns do nothing once VENV/triton/.installed matches the version):
#   VENV/triton/pytriton/tritonserver/bin/tritonserver        the server binary (+x)
#   VENV/triton/pytriton/tritonserver/backends/python/        Python backend, with the stub for VENV's Python
#   VENV/triton/nvidia_pytriton.libs/                         shared libraries (LD_LIBRARY_PATH)
# services/triton.py: find_tritonserver() looks here (or at $FBAS_TRITONSERVER).
set -euo pipefail

VENV="${1:-.venv}"
VERSION="0.7.0"
PY="$VENV/bin/python"
DEST="$VENV/triton"
STAMP="$DEST/.installed"

if [[ ! -x "$PY" ]]; then
    echo "install_triton.sh: $PY not found: create the venv first (python3 -m venv $VENV)" >&2
    exit 2
fi
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "nvidia-pytriton==$VERSION python$PYVER" ]]; then
    echo "tritonserver already installed in $DEST"
    exit 0
fi

WHEEL_DIR="$(mktemp -d)"
trap 'rm -rf "$WHEEL_DIR" "$DEST.partial"' EXIT
"$PY" -m pip download --no-deps --only-binary=:all: --dest "$WHEEL_DIR" "nvidia-pytriton==$VERSION"
WHEEL="$(ls "$WHEEL_DIR"/nvidia_pytriton-*.whl | head -n 1)"

rm -rf "$DEST.partial"
mkdir -p "$DEST.partial"
"$PY" - "$WHEEL" "$DEST.partial" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist()
               if m.startswith("pytriton/tritonserver/") or m.startswith("nvidia_pytriton.libs/")]
    z.extractall(dest, members)
PYEOF

SERVER="$DEST.partial/pytriton/tritonserver"
STUB_SRC="$SERVER/python_backend_stubs/$PYVER/triton_python_backend_stub"
if [[ ! -f "$STUB_SRC" ]]; then
    echo "install_triton.sh: nvidia-pytriton $VERSION has no Python backend stub for Python $PYVER" \
         "(it has: $(ls "$SERVER/python_backend_stubs" | tr '\n' ' '))" >&2
    exit 3
fi
cp "$STUB_SRC" "$SERVER/backends/python/triton_python_backend_stub"
chmod +x "$SERVER/bin/tritonserver" "$SERVER/backends/python/triton_python_backend_stub"
find "$DEST.partial/nvidia_pytriton.libs" -type f -name '*.so*' -exec chmod +x {} +

rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "nvidia-pytriton==$VERSION python$PYVER" > "$STAMP"
echo "tritonserver installed: $DEST/pytriton/tritonserver/bin/tritonserver"
