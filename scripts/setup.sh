#!/usr/bin/env bash
# Installs what building and running Tollgate needs on a fresh Debian/Ubuntu machine, then
# fetches the default model. Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v clang >/dev/null 2>&1 || need_pkgs+=(clang)
# bindgen (llama-cpp-sys-2) loads libclang at build time.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3 python3-pip)
# llama.cpp is compiled through ccache (scripts/compiler-launcher): a second build of it is cache hits.
command -v ccache >/dev/null 2>&1 || need_pkgs+=(ccache)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "tollgate: installing system packages: ${need_pkgs[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "tollgate: need root (or sudo) to apt-get install ${need_pkgs[*]}" >&2; exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "tollgate: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi

# Plain `cargo …` (README's `cargo loco task …`) builds into ./target: point it at the build
# this script's callers make, so no command after them rebuilds from scratch.
if [ -n "${CARGO_TARGET_DIR:-}" ] && [ ! -e target ]; then
  mkdir -p "$CARGO_TARGET_DIR"
  ln -s "$CARGO_TARGET_DIR" target
fi

./scripts/fetch-model.sh
