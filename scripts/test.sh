#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this): installs what is missing,
# checks formatting and lints, then runs every unit and integration test against the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
./scripts/setup.sh
./scripts/services.sh
# Python clients the tests drive (the official openai SDK), in a git-ignored venv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

# The dashboard's browser test: Debian's Chromium driven by Playwright (no browser download).
if [ ! -x /usr/bin/chromium ]; then
  echo "tollgate: installing chromium for the browser test"
  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
# The test profile, as the tests build. llama.cpp's build script still runs twice on a cold machine
# (its host dependencies hash differently), and the second compile is ccache hits.
cargo clippy --workspace --all-targets --profile test -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
