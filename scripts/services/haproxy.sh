#!/usr/bin/env bash
# haproxy in front of ckpt-service replicas, as a plain process (no systemd, no containers), for the scale-out tests
# (tests/scale/), the scale benchmark (bench/scale.py) and the `scale` compose file (deploy/scale/).
#
#   haproxy.sh start DIR --backend HOST:PORT [--backend HOST:PORT ...] [--port N] [--bind ADDR] [--resolver IP:PORT]
#       writes DIR/haproxy.cfg, starts haproxy in the background (PID in DIR/haproxy.pid, log in DIR/haproxy.log)
#       and waits until it listens; prints the frontend URL http://ADDR:PORT
#   haproxy.sh run DIR ...same options...   writes the config and execs haproxy in the foreground (containers)
#   haproxy.sh config DIR ...same options... only writes DIR/haproxy.cfg
#   haproxy.sh stop DIR   stops only the haproxy that start recorded (SIGTERM, then SIGKILL after 3 s)
#
# The configuration: HTTP mode; request and response bodies are streamed (no `option http-buffer-request`), with
# client/server timeouts of 15 minutes so that a large upload or download is not cut off; health checks
# `GET /readyz` expecting 200 every second (two failures take a replica out, two successes bring it back);
# `retries 3` and `option redispatch` for connections that fail before a request reached a replica (a request
# that a replica has started to read is never replayed: the client retries what is safe to retry); balance
# roundrobin. A stats socket at DIR/haproxy.sock (`show stat`) lets tests see what haproxy sees.
# Defaults: --port 8080, --bind 127.0.0.1. --resolver names a DNS server to re-resolve the backends' names at run
# time (Docker's embedded DNS is 127.0.0.11:53): a replica container that restarts with a new address is found.
# Installs Debian's haproxy when it is missing (needs root, as apt-get does).
set -euo pipefail

usage() {
  echo "usage: haproxy.sh start|run|config DIR --backend HOST:PORT ... [--port N] [--bind ADDR] [--resolver IP:PORT]" >&2
  echo "       haproxy.sh stop DIR" >&2
  exit 64
}

stop() {
  local dir pid
  dir=$(realpath -m "${1:?usage: haproxy.sh stop DIR}")
  [ -f "$dir/haproxy.pid" ] || return 0
  pid=$(cat "$dir/haproxy.pid")
  rm -f "$dir/haproxy.pid"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

# write_config DIR ARGS...: parses the options and writes DIR/haproxy.cfg; sets BIND and PORT.
write_config() {
  DIR=$(realpath -m "${1:-}"); [ -n "${1:-}" ] || usage; shift
  local backends=() resolver=""
  PORT=8080 BIND=127.0.0.1
  while [ $# -gt 0 ]; do
    case "$1" in
      --backend) backends+=("${2:?--backend needs HOST:PORT}"); shift 2 ;;
      --port) PORT=${2:?--port needs a number}; shift 2 ;;
      --bind) BIND=${2:?--bind needs an address}; shift 2 ;;
      --resolver) resolver=${2:?--resolver needs IP:PORT}; shift 2 ;;
      *) echo "haproxy.sh: unknown option $1" >&2; usage ;;
    esac
  done
  [ ${#backends[@]} -gt 0 ] || { echo "haproxy.sh: at least one --backend HOST:PORT" >&2; usage; }
  [[ "$PORT" =~ ^[0-9]+$ ]] || { echo "haproxy.sh: --port must be a number, not $PORT" >&2; exit 64; }
  local b
  for b in "${backends[@]}"; do
    [[ "$b" =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]] || { echo "haproxy.sh: --backend must be HOST:PORT, not $b" >&2; exit 64; }
  done
  mkdir -p "$DIR"
  local server_opts="check inter 1s fall 2 rise 2" resolvers_section="" i=0
  if [ -n "$resolver" ]; then
    # Names resolve at start when they can, and again while running; a name not yet known starts the server DOWN.
    server_opts="$server_opts resolvers dns init-addr last,libc,none"
    resolvers_section=$(printf 'resolvers dns\n    nameserver dns1 %s\n    hold valid 5s\n' "$resolver")
  fi
  {
    cat <<CFG
# Written by scripts/services/haproxy.sh; regenerated on every start.
global
    maxconn 2048
    stats socket $DIR/haproxy.sock mode 600 level admin
    log stdout format raw local0 notice

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # Bodies stream through (no http-buffer-request): an upload of gigabytes is never held here.
    timeout connect 5s
    timeout client 15m
    timeout server 15m
    timeout http-request 30s
    timeout http-keep-alive 10s
    timeout queue 30s
    timeout check 3s
    # A connection that fails before the request reached a replica is retried, on another replica
    # (redispatch). A request a replica has begun to read is never replayed by haproxy.
    retries 3
    retry-on conn-failure
    option redispatch 1

$resolvers_section

frontend ckpt
    bind $BIND:$PORT
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
CFG
    for b in "${backends[@]}"; do
      i=$((i + 1))
      printf '    server replica%d %s %s\n' "$i" "$b" "$server_opts"
    done
  } >"$DIR/haproxy.cfg"
  ensure_haproxy
  haproxy -c -f "$DIR/haproxy.cfg" >/dev/null
}

ensure_haproxy() {
  command -v haproxy >/dev/null && return 0
  PATH=$PATH:/usr/sbin; command -v haproxy >/dev/null && return 0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy; } >&2 \
    || { echo "could not install haproxy" >&2; exit 2; }
}

start() {
  write_config "$@"
  stop "$DIR"
  nohup haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 </dev/null & echo $! >"$DIR/haproxy.pid"
  local host=$BIND
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/$host/$PORT") 2>/dev/null; then
      echo "http://$host:$PORT"
      return 0
    fi
    kill -0 "$(cat "$DIR/haproxy.pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "haproxy did not start listening on $host:$PORT; see $DIR/haproxy.log:" >&2
  tail -n 20 "$DIR/haproxy.log" >&2
  stop "$DIR"
  exit 1
}

run() {
  write_config "$@"
  exec haproxy -db -f "$DIR/haproxy.cfg"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  run) shift; run "$@" ;;
  config) shift; write_config "$@"; echo "$DIR/haproxy.cfg" ;;
  stop) shift; stop "$@" ;;
  *) usage ;;
esac
