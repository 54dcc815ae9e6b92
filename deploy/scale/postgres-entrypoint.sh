#!/usr/bin/env bash
# The scale compose file's PostgreSQL: on the first start, initdb into $PGDATA (the volume) with the user
# $POSTGRES_USER (default ckpt) whose password is $POSTGRES_PASSWORD, and the database $POSTGRES_DB (default ckpt);
# on every start, the server in the foreground, reachable from the compose network with that password
# (scram-sha-256). Durable settings (fsync on): this database is the index of the artifacts.
set -euo pipefail
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user=${POSTGRES_USER:-ckpt} db=${POSTGRES_DB:-ckpt}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  "$BIN/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
  # The database, with the server listening on its socket only.
  "$BIN/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses='' -k /tmp" start >/dev/null
  "$BIN/createdb" -h /tmp -U "$user" -O "$user" "$db"
  "$BIN/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null
  echo "postgres-entrypoint: initialised $PGDATA with the database $db"
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -k /tmp -c max_connections=200
