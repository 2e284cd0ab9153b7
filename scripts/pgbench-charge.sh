#!/usr/bin/env bash
# Postgres's own ceiling for Tollgate's charge statement on this machine (BENCHMARKS.md, key
# check): pgbench runs the statement's shape — one UPDATE … RETURNING that checks the secret's
# hash, revocation, window and quota and counts the call — with no HTTP and no application,
# against one hot row (every client on one key) and a row per client. Compare its figures with
# `tollgate-bench --only keycheck [--keycheck-keys 8]`.
#
#   scripts/pgbench-charge.sh [SECONDS] [CLIENTS]
#
# Uses a scratch database (dropped afterwards) on the local Postgres (trust auth, user postgres).
set -euo pipefail
secs=${1:-10}
clients=${2:-8}
db="tollgate_pgbench_$$"
export PGUSER=${PGUSER:-postgres}
tcp=(-h 127.0.0.1 -p 5432)
sock=(-h /var/run/postgresql -p 5432)
command -v pgbench >/dev/null || { echo "pgbench not found (apt-get install postgresql-client)" >&2; exit 1; }

createdb "${tcp[@]}" "$db"
trap 'dropdb "${tcp[@]}" --if-exists "$db"' EXIT
psql "${tcp[@]}" -q -d "$db" <<SQL
CREATE TABLE api_keys (
  id serial PRIMARY KEY, secret_hash varchar NOT NULL UNIQUE, prefix varchar NOT NULL,
  revoked_at timestamptz, valid_from timestamptz, valid_until timestamptz,
  max_calls bigint, calls_used bigint NOT NULL DEFAULT 0, last_used_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO api_keys (secret_hash, prefix, max_calls)
  SELECT md5(i::text) || md5((i + 1)::text), 'tg_' || i, 1000000000 FROM generate_series(1, $clients) i;
SQL

run() { # rows, connection name, connection args...
  local rows=$1 name=$2; shift 2
  local script
  script=$(mktemp)
  cat >"$script" <<SQL
\set id :client_id % $rows + 1
UPDATE api_keys SET calls_used = calls_used + 1, last_used_at = now()
 WHERE id = :id AND secret_hash = md5(:id::text) || md5((:id + 1)::text) AND revoked_at IS NULL
   AND (valid_from IS NULL OR valid_from <= now()) AND (valid_until IS NULL OR valid_until >= now())
   AND (max_calls IS NULL OR calls_used < max_calls)
 RETURNING *;
SQL
  local tps
  tps=$(pgbench "$@" -n -M prepared -c "$clients" -j 2 -T "$secs" -f "$script" "$db" 2>/dev/null \
    | awk '/^tps/ {printf "%.0f", $3}')
  rm -f "$script"
  printf '%-24s %-12s %8s charges/s\n' "$rows row(s), $clients clients" "$name" "$tps"
}

echo "synchronous_commit = $(psql "${tcp[@]}" -At -d "$db" -c 'show synchronous_commit'), fsync = $(psql "${tcp[@]}" -At -d "$db" -c 'show fsync')"
for rows in 1 "$clients"; do
  run "$rows" TCP "${tcp[@]}"
  run "$rows" "Unix socket" "${sock[@]}"
done
