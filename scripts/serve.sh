#!/usr/bin/env bash
# The one command that starts Tollgate on a fresh machine (embedded default: SQLite database,
# SQLite job queue, in-process worker, default model). Installs what is missing, builds,
# migrates and serves on http://localhost:5150. Extra arguments go to `tollgate-cli start`
# (the same as `cargo loco start`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}
./scripts/setup.sh
profile=${TOLLGATE_PROFILE:-dev}
# Build without the runtime's DATABASE_URL in sight (sqlx macros read it at compile time).
env -u DATABASE_URL cargo build --profile "$profile" --bin tollgate-cli
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
exec "$CARGO_TARGET_DIR/$dir/tollgate-cli" start "$@"
