#!/usr/bin/env bash
# Builds the image with docker-compose, runs the stack, and drives the recipe through it over HTTP from the
# host (tests/docker/e2e_compose.py): upload, name, merge against a built-in and a plugin architecture,
# download, strict load; then restart, and down/up without -v, and check that the artifacts survived.
# Always tears the stack down (down -v). Called by .ci/run after the unit tests; runs on its own too:
#
#   bash .ci/docker-e2e.sh            # docker-compose.yml: one service
#   bash .ci/docker-e2e.sh --scale    # docker-compose.scale.yml: haproxy, two replicas, PostgreSQL, Ceph RGW;
#                                     # the same recipe and checks, through haproxy
#
# Exit status: 0 passed; 1 the e2e failed; 2 the container engine or the torch wheel was not available.
# Environment (all optional): PYTHON (default .venv/bin/python), CKPT_PORT (18765; 18766 with --scale),
# COMPOSE_PROJECT_NAME (ckpt-e2e; ckpt-scale-e2e), CKPT_IMAGE_TAG (e2e), CONTAINER_ENGINE_SCRIPT
# (../shared/tools/container-engine.sh from the repository root), E2E_HEALTH_TIMEOUT seconds (180; 300).
set -euo pipefail

SCALE=0
case "${1:-}" in
    "") ;;
    --scale) SCALE=1 ;;
    *) echo "usage: docker-e2e.sh [--scale]" >&2; exit 64 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ENGINE=${CONTAINER_ENGINE_SCRIPT:-$ROOT/../shared/tools/container-engine.sh}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export CKPT_IMAGE_TAG=${CKPT_IMAGE_TAG:-e2e}
if [ "$SCALE" = 1 ]; then
    # docker-compose reads COMPOSE_FILE itself: every `compose` below works on the scale stack.
    export COMPOSE_FILE=docker-compose.scale.yml
    export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-ckpt-scale-e2e}
    export CKPT_PORT=${CKPT_PORT:-18766}
    HEALTH_TIMEOUT=${E2E_HEALTH_TIMEOUT:-300}
    SERVICES=(postgres ceph ckpt-1 ckpt-2)   # the ones with a health check; haproxy is checked through /readyz
    NAME=docker-scale-e2e
else
    export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-ckpt-e2e}
    export CKPT_PORT=${CKPT_PORT:-18765}
    HEALTH_TIMEOUT=${E2E_HEALTH_TIMEOUT:-180}
    SERVICES=(ckpt)
    NAME=docker-e2e
fi
BASE_URL="http://127.0.0.1:$CKPT_PORT"
SECONDS=0

log() { printf '%s [%4ss]: %s\n' "$NAME" "$SECONDS" "$*"; }
fail() { log "FAILED: $*" >&2; exit 1; }
unavailable() { log "FAILED (no engine): $*" >&2; exit 2; }

[ -x "$PY" ] || fail "no python at $PY (create the .venv first, or set PYTHON)"
"$PY" -c 'import httpx, torch' || fail "$PY cannot import httpx and torch"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-docker-e2e.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- 1. The engine. Its script prints `export DOCKER_HOST=...`; check that before evaluating it.
[ -f "$ENGINE" ] || unavailable "container engine script not found: $ENGINE"
log "starting the container engine ($ENGINE)"
if ! engine_env=$(bash "$ENGINE" 2>"$WORK/engine.log"); then
    tail -n 30 "$WORK/engine.log" >&2
    unavailable "the container engine could not start (log above)"
fi
[[ "$engine_env" =~ ^export\ DOCKER_HOST=[A-Za-z0-9_.:/+-]+$ ]] \
    || unavailable "unexpected output from the engine script: ${engine_env:0:200}"
eval "$engine_env"
# The Debian client matches the engine; another docker CLI earlier on PATH may not (see the engine script).
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
command -v docker-compose >/dev/null || unavailable "docker-compose is not installed"
$DOCKER info >/dev/null 2>&1 || unavailable "the engine does not answer at $DOCKER_HOST"
log "engine ready at $DOCKER_HOST"

# --- 2. The torch wheel (the PyTorch index is not reachable here): into the git-ignored wheels/.
wheel_path=$(bash "$ENGINE" --torch-wheel "$ROOT/wheels" 2>"$WORK/wheel.log" | tail -n 1) \
    || { tail -n 20 "$WORK/wheel.log" >&2; unavailable "could not fetch the torch wheel"; }
[ -f "$wheel_path" ] || unavailable "the torch wheel is missing: $wheel_path"
TORCH_WHEEL="wheels/$(basename "$wheel_path")"
export TORCH_WHEEL
log "torch wheel: $TORCH_WHEEL"

# --- 3. Operator settings through the env file, as a deployment would set them: a write token.
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf 'CKPT_API_TOKENS=write:%s\n' "$token" > "$WORK/ckpt.env"
export CKPT_ENV_FILE="$WORK/ckpt.env"
export CKPT_E2E_TOKEN="$token"

compose() { docker-compose --ansi never "$@"; }
teardown() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        log "service logs (last 150 lines):"
        compose logs --no-color --tail=150 2>&1 || true
    fi
    log "tearing down (down -v)"
    compose down -v --remove-orphans >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; true; }
    rm -rf "$WORK"
    log "done in ${SECONDS}s, status $rc"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# A stack left over by an interrupted run would hide a fresh-volume bug: start clean.
compose down -v --remove-orphans >/dev/null 2>&1 || true

# --- 4. Build through the compose file's build sections (TORCH_WHEEL reaches the Dockerfile as a build arg).
log "building the images ($(compose config --services | tr '\n' ' '))"
if ! compose build >"$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log" >&2
    fail "docker-compose build failed"
fi
log "images built"
for image in $(compose config | sed -n 's/^ *image: *//p' | sort -u); do
    size=$($DOCKER image inspect -f '{{.Size}}' "$image")
    log "image $image: $((size / 1000000)) MB"
done

wait_healthy() {
    local service cid status deadline=$((SECONDS + HEALTH_TIMEOUT))
    for service in "${SERVICES[@]}"; do
        cid=$(compose ps -q "$service")
        [ -n "$cid" ] || fail "no container for the service $service"
        while :; do
            status=$($DOCKER inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
            case "$status" in
                "running healthy") log "$service healthy"; break ;;
                # With depends_on, a replica may restart (restart: unless-stopped) while PostgreSQL and Ceph
                # start; only the deadline ends that wait.
                restarting*) [ "$SCALE" = 1 ] || fail "$service is $status" ;;
                *unhealthy*|exited*|dead*) fail "$service is $status" ;;
            esac
            [ "$SECONDS" -lt "$deadline" ] || fail "$service not healthy after ${HEALTH_TIMEOUT}s (status: $status)"
            sleep 2
        done
    done
}

# --- 5. Up, the recipe, and persistence across a restart and across down/up without -v.
log "docker-compose up -d (port 127.0.0.1:$CKPT_PORT)"
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "docker-compose up failed"; }
wait_healthy
uid=$(compose exec -T "${SERVICES[-1]}" id -u)
[ "$uid" != "0" ] || fail "the service runs as root"
log "service runs as uid $uid"

"$PY" tests/docker/e2e_compose.py recipe --base-url "$BASE_URL" --state "$WORK/state.json"

log "docker-compose restart"
compose restart >/dev/null 2>&1 || fail "docker-compose restart failed"
wait_healthy
"$PY" tests/docker/e2e_compose.py check --base-url "$BASE_URL" --state "$WORK/state.json"

log "docker-compose down (keeping the volume), then up: a new container on the same volume"
compose down >/dev/null 2>&1 || fail "docker-compose down failed"
if [ "$SCALE" = 1 ]; then
    # The replicas' own volumes are scratch (staging, read cache): without them the artifacts must all come back
    # from PostgreSQL and the bucket.
    log "removing the replicas' scratch volumes"
    $DOCKER volume rm "${COMPOSE_PROJECT_NAME}_ckpt-1-scratch" "${COMPOSE_PROJECT_NAME}_ckpt-2-scratch" >/dev/null \
        || fail "could not remove the scratch volumes"
fi
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "docker-compose up failed"; }
wait_healthy
"$PY" tests/docker/e2e_compose.py check --base-url "$BASE_URL" --state "$WORK/state.json"

log "PASSED"
