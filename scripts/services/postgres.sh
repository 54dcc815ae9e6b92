#!/usr/bin/env bash
# A throwaway PostgreSQL cluster as a plain process (no systemd, no pg_createcluster), for tests and benchmarks.
# After ../shared/tools/postgres/start.sh and stop.sh (the team's shared tool), vendored so that a fresh clone and
# CI need nothing beside the repository.
#
#   scripts/services/postgres.sh start DIR   initdb into DIR (wiped first) and start on $PGPORT (default 25432);
#                                            prints the server URL postgresql://postgres@127.0.0.1:PORT
#   scripts/services/postgres.sh stop DIR    fast shutdown by the postmaster's PID (a no-op when not running)
#
# Installs Debian's postgresql when no server binaries are found (needs root and apt). As root the server runs as
# the user postgres (initdb refuses root), so DIR must be reachable by it (e.g. under /tmp); otherwise as the
# current user. Durability is off (fsync, synchronous_commit, full_page_writes): the data is thrown away.
set -euo pipefail
cmd=${1:-}
DIR=$(realpath -m "${2:?usage: postgres.sh start|stop DIR}")

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
  if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } >&2 \
      || { echo "could not install postgresql" >&2; exit 2; }
  fi
  PORT=${PGPORT:-25432}
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  rm -rf "$DIR"
  mkdir -p "$DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
  as_owner "$BIN/initdb" -D "$DIR/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 --no-sync >"$DIR/initdb.log"
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start -o \
    "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null
  head -1 "$DIR/data/postmaster.pid" > "$DIR/postgres.pid"
  echo "postgresql://postgres@127.0.0.1:$PORT"
  ;;
stop)
  [ -f "$DIR/postgres.pid" ] || exit 0
  pid=$(cat "$DIR/postgres.pid")
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$DIR/postgres.pid"
  ;;
*)
  echo "usage: postgres.sh start|stop DIR" >&2
  exit 2
  ;;
esac
