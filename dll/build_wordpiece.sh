#!/usr/bin/env bash
# Compile the C WordPiece tokenizer (dll/src/fbas_wordpiece.c) into dll/build/libfbas_wordpiece.so.
# Needs only a C compiler (CC, default cc); `make setup` runs it. Without the library fbas tokenizes with
# HF tokenizers (dll/wordpiece.py falls back), so a failed build is not fatal to the caller.
#   bash dll/build_wordpiece.sh              optimized build
#   SANITIZE=1 bash dll/build_wordpiece.sh   ASan + UBSan build, to dll/build/asan/libfbas_wordpiece.so
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cc_bin="${CC:-cc}"
if ! command -v "$cc_bin" >/dev/null 2>&1; then
  echo "dll/build_wordpiece.sh: no C compiler ($cc_bin); fbas will tokenize with HF tokenizers" >&2
  exit 2
fi
out="$here/build"
flags=(-O3 -shared -fPIC -std=c11 -Wall -Wextra -D_POSIX_C_SOURCE=200809L)
if [ "${SANITIZE:-0}" = 1 ]; then
  out="$here/build/asan"
  flags=(-O1 -g -shared -fPIC -std=c11 -Wall -Wextra -D_POSIX_C_SOURCE=200809L -fno-omit-frame-pointer
    -fsanitize=address,undefined -fno-sanitize-recover=undefined)
fi
mkdir -p "$out"
tmp="$out/libfbas_wordpiece.so.tmp"
"$cc_bin" "${flags[@]}" ${CFLAGS:-} -o "$tmp" "$here/src/fbas_wordpiece.c" -lpthread
mv -f "$tmp" "$out/libfbas_wordpiece.so"
echo "built $out/libfbas_wordpiece.so"
