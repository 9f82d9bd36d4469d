#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for tests/serving/test_store_postgres.py and print its
# SQLAlchemy URL on stdout (everything else goes to stderr):
#
#   export CHATFORGE_TEST_PG_URL="$(tools/start_postgres.sh)"
#   .venv/bin/pytest tests/serving/test_store_postgres.py
#   tools/start_postgres.sh --stop
#
# Installs Debian's postgresql package if no server binaries are found (needs root and apt),
# creates a fresh cluster under $PGWORK (default /tmp/chatforge-pg), trust auth, listening on
# 127.0.0.1 only, and waits until it accepts connections. Nothing here is for production.
set -euo pipefail

PGWORK="${PGWORK:-/tmp/chatforge-pg}"
PGPORT="${PGPORT:-55432}"
PGDATA="$PGWORK/data"
log() { echo "start_postgres: $*" >&2; }

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

# postgres refuses to run as root: run its tools as an unprivileged user when we are root.
as_pg() {
  if [[ "$(id -u)" == 0 ]]; then
    runuser -u "$PGUSER_OS" -- "$@"
  else
    "$@"
  fi
}

if [[ "${1:-}" == "--stop" ]]; then
  BINDIR="$(find_bindir)" || { log "no PostgreSQL installed"; exit 0; }
  PGUSER_OS="$(stat -c %U "$PGDATA" 2>/dev/null || id -un)"
  if [[ -f "$PGDATA/postmaster.pid" ]]; then
    as_pg "$BINDIR/pg_ctl" -D "$PGDATA" -m fast -w stop >&2
  fi
  rm -rf "$PGWORK"
  exit 0
fi

start=$(date +%s)
if ! BINDIR="$(find_bindir)"; then
  command -v apt-get >/dev/null || { log "no PostgreSQL found and no apt-get to install it"; exit 1; }
  log "installing Debian's postgresql package..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # --no-install-recommends keeps it to the server, client and their libraries.
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BINDIR="$(find_bindir)"
fi
log "server binaries: $BINDIR ($(( $(date +%s) - start )) s)"

PGUSER_OS="$(id -un)"
if [[ "$(id -u)" == 0 ]]; then
  PGUSER_OS=postgres
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

if [[ -f "$PGDATA/postmaster.pid" ]]; then
  as_pg "$BINDIR/pg_ctl" -D "$PGDATA" -m immediate -w stop >&2 || true
fi
rm -rf "$PGWORK"
mkdir -p "$PGWORK"
[[ "$(id -u)" == 0 ]] && chown "$PGUSER_OS" "$PGWORK"

as_pg "$BINDIR/initdb" -D "$PGDATA" -U chatforge --auth=trust --encoding=UTF8 --locale=C.UTF-8 -N >/dev/null
# Throwaway data: no fsync. Socket in PGWORK (the default /run/postgresql may not exist or be writable).
as_pg "$BINDIR/pg_ctl" -D "$PGDATA" -l "$PGWORK/server.log" -w -t 30 \
  -o "-h 127.0.0.1 -p $PGPORT -k $PGWORK -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  start >&2
as_pg "$BINDIR/createdb" -h 127.0.0.1 -p "$PGPORT" -U chatforge chatforge_test
log "ready in $(( $(date +%s) - start )) s; stop with: $0 --stop"
echo "postgresql+psycopg://chatforge@127.0.0.1:$PGPORT/chatforge_test"
