#!/usr/bin/env bash
# Builds tollgate-cli with CUDA on a machine without a GPU, and packs what a GPU machine needs.
#
#   ./scripts/build-cuda.sh            # sm_90 (H100/H200); TOLLGATE_CUDA_ARCHS="90;100" for more
#
# The CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (pinned below: GPU machines with driver
# 580 run CUDA 13.0), installed into .cuda/ (git-ignored) and laid out so CMake finds it. No
# libcuda.so driver stub ships in the wheels, so llama.cpp is built without the driver API
# (`cuda-no-vmm`). llama.cpp is built as shared libraries that link the CUDA runtime and cuBLAS
# dynamically; the binary finds them next to itself (rpath $ORIGIN).
#
# Output: dist/tollgate-cuda-sm<archs>.tar.xz holding tollgate-cli and tollgate-bench, llama.cpp's
# libraries (all stripped), config/ and assets/, a demo LoRA head, gpu-smoke.sh and MANIFEST.txt (CUDA
# version, architectures, the shared libraries needed: ldd). Unpack it on the GPU machine and run
# its gpu-smoke.sh against its tollgate-cli. The last line printed is the archive's path. Not
# part of CI (an hour or more on two cores; HOWTO.md, GPU section).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
archs=${TOLLGATE_CUDA_ARCHS:-90}
toolkit=${TOLLGATE_CUDA_DIR:-$root/.cuda}
export CARGO_TARGET_DIR=${TOLLGATE_CUDA_TARGET:-$HOME/.cache/tollgate-target-cuda}
started=$(date +%s)

./scripts/setup.sh

# 1. The toolkit, from PyPI (13.0 series), into a venv of its own.
if [ ! -x "$toolkit/venv/bin/python" ]; then
  python3 -m venv "$toolkit/venv" || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$toolkit/venv"; }
fi
"$toolkit/venv/bin/python" -m pip install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
cu=$(echo "$toolkit"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "tollgate: nvcc not found under $cu" >&2; exit 1; }
# The wheels ship only versioned names; CMake and the linker look for the plain ones.
for so in "$cu"/lib/lib*.so.*; do
  base=${so%%.so.*}.so
  [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
done
cuda_version=$("$cu/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
echo "tollgate: CUDA $cuda_version from PyPI in $cu; architectures: $archs" >&2

# 2. The build: CMake takes the compiler, toolkit and architectures from the environment.
export CUDACXX="$cu/bin/nvcc" CUDAToolkit_ROOT="$cu" CUDA_PATH="$cu" CUDAARCHS="$archs"
export PATH="$cu/bin:$PATH" LIBRARY_PATH="$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LLAMA_BUILD_SHARED_LIBS=1
export RUSTFLAGS='-C link-arg=-Wl,-rpath,$ORIGIN'
# Without the default `cpu-variants`: the GPU does the work, and this archive's layout (llama.cpp's
# libraries beside the binaries, CUDA linked into them) is the one proven by gpu-smoke.sh.
env -u DATABASE_URL nice -n 10 cargo build --release --no-default-features --features cuda-no-vmm \
  --bin tollgate-cli --bin tollgate-bench

# 3. Pack: the binaries, llama.cpp's shared libraries, the config, a demo LoRA head and a
# manifest: everything scripts/gpu-smoke.sh needs besides the model.
name="tollgate-cuda-sm${archs//;/-sm}"
out="$root/dist/$name"
rm -rf "$out" && mkdir -p "$out/config" "$out/adapters"
cp "$CARGO_TARGET_DIR/release/tollgate-cli" "$CARGO_TARGET_DIR/release/tollgate-bench" "$out/"
cp config/development.yaml "$out/config/"
cp -r assets "$out/"
cp scripts/gpu-smoke.sh "$out/"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/python -m pip install -q -r tests/python/requirements.txt
fi
.venv/bin/python scripts/make-lora.py --out "$out/adapters/demo.gguf" >&2
# llama.cpp's libraries under the names the binaries ask for (their SONAMEs, `lib*.so.0`).
libdir=$(ls -d "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/lib 2>/dev/null | head -n 1)
[ -n "$libdir" ] || { echo "tollgate: llama.cpp's libraries not found under $CARGO_TARGET_DIR" >&2; exit 1; }
for lib in "$libdir"/lib*.so.0; do
  cp -L "$lib" "$out/"
done
strip --strip-unneeded "$out"/tollgate-cli "$out"/tollgate-bench "$out"/lib*.so* 2>/dev/null || true
# Each library finds the others beside it too (llama.cpp links them to one another).
command -v patchelf >/dev/null 2>&1 || { apt-get install -y -qq patchelf >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq patchelf >/dev/null; }; }
for lib in "$out"/lib*.so.0; do
  patchelf --set-rpath '$ORIGIN' "$lib"
done
{
  echo "tollgate-cli built with --features cuda-no-vmm on $(date -u +%FT%TZ) ($(uname -m))"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "CUDA: $cuda_version (PyPI wheels: nvcc 13.0.88, runtime 13.0.96, cuBLAS 13.0.2.14)"
  echo "architectures: sm_${archs//;/ sm_}"
  echo "build seconds: $(( $(date +%s) - started ))"
  echo
  echo "Shared libraries needed (ldd, with this build's CUDA libraries on LD_LIBRARY_PATH;"
  echo "llama.cpp's own are found beside each file, rpath \$ORIGIN):"
  (cd "$out" && ldd ./tollgate-cli ./tollgate-bench ./lib*.so* 2>&1 | sed 's/ (0x[0-9a-f]*)//')
  echo
  echo "On the GPU machine: libcudart.so.13 and libcublas.so.13 (CUDA 13 runtime, e.g. the"
  echo "nvidia-cuda-runtime and nvidia-cublas wheels) on LD_LIBRARY_PATH, and driver >= 580."
  echo
  ls -l "$out"
} > "$out/MANIFEST.txt"
tar -C "$root/dist" -cJf "$root/dist/$name.tar.xz" "$name"
ls -l "$root/dist/$name.tar.xz" >&2
echo "tollgate: built in $(( $(date +%s) - started )) s" >&2
echo "$root/dist/$name.tar.xz"
