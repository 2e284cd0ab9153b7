#!/usr/bin/env bash
# Installs a built tollgate-cli with what it loads at run time: llama.cpp's shared libraries and
# its CPU backend variants (one module per instruction set; the best one for the machine is chosen
# at start-up, so the installed folder runs on any x86-64 or ARM64 machine of its kind).
#
#   scripts/install.sh [--profile release|debug | --bin PATH] DEST     e.g. /opt/tollgate/bin
#
# DEST gets tollgate-cli, llama.cpp's libraries beside it (the binary's run path is set to
# $ORIGIN) and backends/ with the CPU variants. Build first: `cargo build --release --bin
# tollgate-cli` (same CARGO_TARGET_DIR as here).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
bin=
case "${1:-}" in
  --profile) profile=${2:?--profile needs release or debug}; shift 2 ;;
  --bin) bin=${2:?--bin needs the path of a built tollgate-cli}; shift 2 ;;
esac
dest=${1:?usage: scripts/install.sh [--profile release|debug | --bin PATH] DEST}
if [ -z "$bin" ]; then
  target=${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}
  [ -d "$target" ] || target=target
  bin=$target/$profile/tollgate-cli
fi
[ -x "$bin" ] || { echo "tollgate: no $bin; build it first (cargo build --release --bin tollgate-cli)" >&2; exit 1; }
for tool in readelf patchelf; do
  command -v "$tool" >/dev/null 2>&1 || apt-get install -y -qq binutils patchelf >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq binutils patchelf >/dev/null; }
done

# build.rs puts the build's own library folder first in the binary's run path.
libdir=$(readelf -d "$bin" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p; s/.*(RPATH).*\[\(.*\)\]/\1/p' \
  | tr ':' '\n' | grep -v '^\$ORIGIN' | head -n 1)
[ -n "$libdir" ] && [ -d "$libdir" ] || { echo "tollgate: $bin names no llama.cpp library folder" >&2; exit 1; }
backends=$(dirname "$libdir")/backends

install -d "$dest"
install -m 0755 "$bin" "$dest/tollgate-cli"
patchelf --set-rpath '$ORIGIN' "$dest/tollgate-cli"
# The libraries under the names the binary asks for (their SONAMEs), not the symlinks.
for lib in "$libdir"/lib*.so*; do
  [ -L "$lib" ] && continue
  soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  cp "$lib" "$dest/${soname:-$(basename "$lib")}"
done
if [ -d "$backends" ]; then
  install -d "$dest/backends"
  cp -L "$backends"/*.so "$dest/backends/"
fi
missing=$(ldd "$dest/tollgate-cli" | grep 'not found' || true)
[ -z "$missing" ] || { echo "tollgate: $dest/tollgate-cli still misses: $missing" >&2; exit 1; }
echo "tollgate: installed $(ls "$dest" | wc -l) files into $dest ($(ls "$dest/backends" 2>/dev/null | wc -l) CPU variants)" >&2
echo "$dest/tollgate-cli"
