#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server`, for `tollgate-bench --compare-llama-server` (issue 16):
# the bar Tollgate is measured against, on the same machine, model and threads.
#
# The source is pinned: the llama.cpp that the PyPI sdist of llama-cpp-python vendors (PyPI is
# reachable from this machine; GitHub is not needed), checked against its SHA-256. Built with
# CMake in Release with llama.cpp's defaults (GGML_NATIVE: the CPU it is built on, as a user
# building llama-server gets), no curl, only the server target. The build is cached under
# ${TOLLGATE_CACHE:-~/.cache/tollgate}; a second run only prints the path.
#
# The last line printed is the path of the `llama-server` binary; `llama-bench` and
# `llama-batched-bench` (the same build's raw decode benchmarks, one and N sequences) are built
# beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/llama-server-$VERSION
BIN=$CACHE/build/bin/llama-server
# Without AMX: llama.cpp's AMX kernels, built by GCC, die with SIGILL at their first tile load
# (ggml-org/llama.cpp#26954), so on an AMX-capable Xeon a GGML_NATIVE build cannot run a prompt.
# Tollgate skips its AMX variant for the same reason; both then run AVX-512 kernels there.
# Elsewhere these flags change nothing.
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
STAMP=$CACHE/build/tollgate-flags

if [ -x "$BIN" ] && [ -x "$(dirname "$BIN")/llama-bench" ] && [ -x "$(dirname "$BIN")/llama-batched-bench" ] \
  && [ "$(cat "$STAMP" 2>/dev/null)" = "$FLAGS" ]; then
  echo "$BIN"
  exit 0
fi

for tool in cmake g++ make; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "tollgate: installing the C++ toolchain (cmake, g++, make)" >&2
    apt-get install -y -qq cmake g++ make >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq cmake g++ make >/dev/null; }
    break
  fi
done

mkdir -p "$CACHE"
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ] || ! echo "$SHA256  $SDIST" | sha256sum -c --status; then
  echo "tollgate: downloading llama-cpp-python $VERSION (sdist, for its vendored llama.cpp)" >&2
  tmp=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
    -d "$tmp" "llama-cpp-python==$VERSION" >&2
  mv "$tmp"/llama_cpp_python-$VERSION.tar.gz "$SDIST"
  rm -rf "$tmp"
fi
echo "$SHA256  $SDIST" | sha256sum -c --status \
  || { echo "tollgate: $SDIST does not match its pinned SHA-256" >&2; exit 1; }

SRC=$CACHE/src
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

echo "tollgate: building llama-server (Release, $(nproc) jobs; minutes on a small machine)" >&2
cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  "-DCMAKE_C_FLAGS=$FLAGS" "-DCMAKE_CXX_FLAGS=$FLAGS" >&2
cmake --build "$CACHE/build" --target llama-server llama-bench llama-batched-bench -j "$(nproc)" >&2
for made in "$BIN" "$(dirname "$BIN")/llama-bench" "$(dirname "$BIN")/llama-batched-bench"; do
  test -x "$made" || { echo "tollgate: the build made no $made" >&2; exit 1; }
done
echo "$FLAGS" > "$STAMP"
echo "$BIN"
